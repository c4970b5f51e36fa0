"""Per-trial files as Optuna artifacts, and notes, so optuna-dashboard shows what happened.

Each launched trial's server log, bench_serving JSONL and logs, and argv files are copied
into a :class:`optuna.artifacts.FileSystemArtifactStore` at ``studies/<study>/artifacts``
(beside the trial folders). Upload while the trial is still running (before ``tell``):
Optuna refuses to change a finished trial. For trials that finished earlier (a study run
before artifacts existed) the metadata goes into the study's system attrs under the key
optuna-dashboard reads for per-trial artifacts, so backfilled files still show on the trial.
"""
from __future__ import annotations

import json
import mimetypes
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial

from tuner.config import ConfirmSpec
from tuner.report.units import fmt_metric
from tuner.selection import pick
from tuner.storage import ATTR_BASELINE, ATTR_LAUNCHED, ATTR_TRIAL_DIR, STUDY_ATTR_ARTIFACT_DIR, metrics_of, objective_keys

ARTIFACT_DIR_NAME = "artifacts"
# Files of a trial folder worth seeing in the dashboard (written by tuner.trial / tuner.bench).
TRIAL_FILE_PATTERNS = ("server.log", "server.argv.json", "quality.json", "bench-*.jsonl", "bench-*.log",
                       "bench-*.argv.json", "expert-distribution/expert_distribution_recorder_*.pt")
MAX_ARTIFACT_BYTES = 16 << 20  # a larger log is uploaded as head + tail
_OPTUNA_PREFIX = "artifacts:"  # optuna.artifacts' trial/study system-attr key prefix
_DASHBOARD_TRIAL_PREFIX = "dashboard:artifacts:"  # optuna-dashboard's per-trial key in study attrs
_MIME = {".log": "text/plain", ".jsonl": "text/plain", ".json": "application/json", ".txt": "text/plain"}


@dataclass(frozen=True)
class UploadedArtifact:
    artifact_id: str
    filename: str
    source: Path
    truncated: bool


def artifact_dir_for(trial_dir: Path) -> Path:
    """``studies/<study>/trial-N`` → ``studies/<study>/artifacts``."""
    return Path(trial_dir).resolve().parent / ARTIFACT_DIR_NAME


def study_artifact_dir(study: optuna.Study, studies_dir: Path | None = None) -> Path | None:
    """Where the study's artifacts are: recorded at the first upload, else the default under
    `studies_dir` (None when neither is known)."""
    recorded = study.user_attrs.get(STUDY_ATTR_ARTIFACT_DIR)
    if recorded:
        return Path(recorded)
    if studies_dir is not None:
        return Path(studies_dir).resolve() / study.study_name / ARTIFACT_DIR_NAME
    return None


def open_store(path: Path) -> FileSystemArtifactStore:
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def trial_files(trial_dir: Path) -> list[Path]:
    found: dict[Path, None] = {}
    for pattern in TRIAL_FILE_PATTERNS:
        for p in sorted(Path(trial_dir).glob(pattern)):
            if p.is_file():
                found[p] = None
    return list(found)


def _frozen(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int) -> FrozenTrial:
    if isinstance(trial, FrozenTrial):
        return trial
    if isinstance(trial, optuna.Trial):
        return study._storage.get_trial(trial._trial_id)
    for t in study.get_trials(deepcopy=False):
        if t.number == trial:
            return t
    raise KeyError(f"study {study.study_name!r} has no trial {trial}")


def existing_filenames(study: optuna.Study, trial: FrozenTrial) -> set[str]:
    names = set()
    for key, value in trial.system_attrs.items():
        if key.startswith(_OPTUNA_PREFIX):
            names.add(json.loads(value).get("filename", ""))
    prefix = f"{_DASHBOARD_TRIAL_PREFIX}{trial._trial_id}:"
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        if key.startswith(prefix):
            names.add(json.loads(value).get("filename", ""))
    return names


def _capped_copy(src: Path, tmp: Path, max_bytes: int) -> tuple[Path, bool]:
    """The file itself, or a copy with its head and tail when it is larger than max_bytes."""
    size = src.stat().st_size
    if size <= max_bytes:
        return src, False
    head, tail = max_bytes // 4, max_bytes - max_bytes // 4
    out = tmp / src.name
    with open(src, "rb") as fin, open(out, "wb") as fout:
        fout.write(fin.read(head))
        fout.write(f"\n\n[... kttune: {size - head - tail} bytes cut; the full file is {src} ...]\n\n".encode())
        fin.seek(size - tail)
        fout.write(fin.read())
    return out, True


def upload_trial_artifacts(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int, trial_dir: Path, *,
                           store_dir: Path | None = None, max_bytes: int = MAX_ARTIFACT_BYTES) -> list[UploadedArtifact]:
    """Upload the trial folder's files (skipping names the trial already has). `trial` is a
    live Trial, a FrozenTrial or a trial *number*. Call it before ``study.tell`` so the files
    attach through Optuna's own API; afterwards they attach through the dashboard's key."""
    frozen = _frozen(study, trial)
    files = trial_files(trial_dir)
    if not files:
        return []
    store_path = (store_dir or artifact_dir_for(trial_dir)).resolve()
    store = open_store(store_path)
    if study.user_attrs.get(STUDY_ATTR_ARTIFACT_DIR) != str(store_path):
        study.set_user_attr(STUDY_ATTR_ARTIFACT_DIR, str(store_path))
    have = existing_filenames(study, frozen)
    out = []
    with tempfile.TemporaryDirectory(prefix="kttune-artifact-") as tmp:
        for path in files:
            if path.name in have:
                continue
            src, cut = _capped_copy(path, Path(tmp), max_bytes)
            mimetype = _MIME.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if not frozen.state.is_finished():
                aid = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(src), study_or_trial=frozen,
                                                       storage=study._storage, mimetype=mimetype)
            else:
                aid = _attach_to_finished(study, frozen, store, src, mimetype)
            out.append(UploadedArtifact(aid, path.name, path, cut))
    return out


def _attach_to_finished(study: optuna.Study, trial: FrozenTrial, store: FileSystemArtifactStore, src: Path,
                        mimetype: str) -> str:
    artifact_id = str(uuid.uuid4())
    with open(src, "rb") as fh:
        store.write(artifact_id, fh)
    meta = {"artifact_id": artifact_id, "filename": src.name, "mimetype": mimetype, "encoding": None}
    study._storage.set_study_system_attr(study._study_id, f"{_DASHBOARD_TRIAL_PREFIX}{trial._trial_id}:{artifact_id}",
                                         json.dumps(meta))
    return artifact_id


def backfill_artifacts(study: optuna.Study, *, store_dir: Path | None = None) -> int:
    """Upload the files of every launched trial whose folder still exists; returns the count."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        trial_dir = t.user_attrs.get(ATTR_TRIAL_DIR)
        if t.user_attrs.get(ATTR_LAUNCHED) and trial_dir and Path(trial_dir).is_dir() and t.state.is_finished():
            n += len(upload_trial_artifacts(study, t, Path(trial_dir), store_dir=store_dir))
    return n


def list_artifacts(study: optuna.Study, trial: FrozenTrial) -> list[dict[str, str]]:
    """Artifact metadata of a trial from both places (Optuna's and the dashboard's key)."""
    metas = [json.loads(v) for k, v in trial.system_attrs.items() if k.startswith(_OPTUNA_PREFIX)]
    prefix = f"{_DASHBOARD_TRIAL_PREFIX}{trial._trial_id}:"
    metas += [json.loads(v) for k, v in study._storage.get_study_system_attrs(study._study_id).items()
              if k.startswith(prefix)]
    return metas


# --------------------------------------------------------------------------- notes


def _md_values(t: FrozenTrial, keys: Sequence[str]) -> str:
    m = metrics_of(t)
    return ", ".join(f"{k} = {fmt_metric(k, m.get(k))}" for k in keys)


def study_note(study: optuna.Study, confirm: ConfirmSpec) -> str:
    """Markdown: the baseline and the feasible best trial(s), with measured objective values
    and the change against the baseline."""
    keys = objective_keys(study)
    trials = study.get_trials(deepcopy=False)
    base = next((t for t in trials if t.user_attrs.get(ATTR_BASELINE) and metrics_of(t)), None)
    best = pick(study, confirm)
    lines = [f"## kttune study `{study.study_name}`", ""]
    lines.append(f"**Baseline:** trial {base.number}: {_md_values(base, keys)}" if base else
                 "**Baseline:** not measured (yet)")
    lines.append("")
    if not best:
        lines.append("**Best:** no trial meets every constraint yet.")
    else:
        lines.append("**Pareto front:**" if len(best) > 1 else "**Best:**")
        bm = metrics_of(base) if base else {}
        for t in best:
            m = metrics_of(t)
            deltas = [f"{k} {100 * (m[k] - bm[k]) / abs(bm[k]):+.1f}%" for k in keys if k in m and bm.get(k)]
            vs = f" (vs baseline: {', '.join(deltas)})" if deltas else ""
            if base is not None and t.number == base.number:
                vs = " (the baseline itself: no configuration tried beat it)"
            lines.append(f"- trial {t.number}: {_md_values(t, keys)}{vs}")
    lines += ["", "Only trials that meet every constraint (SLOs included) count here; the dashboard's own "
              "*Best Trial* badges and Pareto plot do not apply constraints. Its *Hyperparameter Importance* "
              "panel counts every COMPLETE trial, configurations predicted not to fit (told with a placeholder "
              "value) and repeats included; `kttune report` ranks knobs over feasible measured trials only, and "
              "only those that took more than one value.",
              "", "Each launched trial has its server log, bench_serving JSONL and argv under *Artifacts*."]
    return "\n".join(lines)


def note_baseline_and_best(study: optuna.Study, confirm: ConfirmSpec) -> str:
    """Write :func:`study_note` as the study's optuna-dashboard note, name the objectives for
    the dashboard, and mark the baseline trial; returns the note."""
    from optuna_dashboard import get_note, save_note

    body = study_note(study, confirm)
    if get_note(study) != body:
        save_note(study, body)
    keys = objective_keys(study)
    if keys and study.metric_names is None:
        with warnings.catch_warnings():  # set_metric_names is experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(keys)
    base = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(ATTR_BASELINE)), None)
    if base is not None:
        handle = optuna.Trial(study, base._trial_id)
        text = (f"**Baseline**: the space's `baseline:` configuration, measured first.\n\n"
                f"{_md_values(base, keys) if metrics_of(base) else 'not measured'}")
        if get_note(handle) != text:
            save_note(handle, text)
    return body


def try_upload_trial_artifacts(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int, trial_dir: Path,
                               log: Callable[[str], None]) -> int:
    """:func:`upload_trial_artifacts` for the tuning loop: a failed upload is logged, never
    raised (the measurement matters more than its attachments). Returns the count."""
    try:
        return len(upload_trial_artifacts(study, trial, trial_dir))
    except Exception as exc:  # disk full, store permissions, storage hiccup
        log(f"  artifacts not uploaded: {type(exc).__name__}: {exc}")
        return 0




def prepare_dashboard(study_name: str, storage: str, studies_dir: Path, confirm: ConfirmSpec, *,
                      log: Callable[[str], None] = print) -> tuple[FileSystemArtifactStore, Path]:
    """The artifact store `kttune dashboard` serves, after uploading the files of finished
    trials that have none yet and refreshing the baseline/best note. A study that does not
    exist yet gets an empty store at the default place (the dashboard still lists others)."""
    from tuner.errors import ConfigError
    from tuner.storage import load_study

    try:
        study = load_study(study_name, storage)
    except ConfigError as exc:
        log(f"note: {exc}")
        path = Path(studies_dir).resolve() / study_name / ARTIFACT_DIR_NAME
        return open_store(path), path
    store_dir = study_artifact_dir(study, studies_dir) or Path(studies_dir).resolve() / study_name / ARTIFACT_DIR_NAME
    added = backfill_artifacts(study, store_dir=store_dir)
    if added:
        log(f"uploaded {added} trial file(s) of earlier trials to {store_dir}")
    note_baseline_and_best(study, confirm)
    return open_store(store_dir), store_dir
