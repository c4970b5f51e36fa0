"""Trial files as Optuna artifacts, dashboard notes, and `kttune dashboard` serving them
(a real optuna-dashboard process, checked over HTTP on 127.0.0.1)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta

from tuner.config import ConfirmSpec
from tuner.report.artifacts import (
    STUDY_ATTR_ARTIFACT_DIR,
    backfill_artifacts,
    list_artifacts,
    note_baseline_and_best,
    open_store,
    study_note,
    try_upload_trial_artifacts,
    upload_trial_artifacts,
)
from tuner.storage.attrs import ATTR_BASELINE, ATTR_LAUNCHED, ATTR_TRIAL_DIR, METRIC_PREFIX, STUDY_ATTR_SPACE

REPO = Path(__file__).resolve().parents[2]
DIST = {"kt-num-gpu-experts": optuna.distributions.IntDistribution(0, 240, step=8)}
KEY = "decode.output_throughput"


def write_trial_files(trial_dir: Path, number: int) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "server.log").write_text(f"trial {number} log\nThe server is fired up and ready to roll!\n")
    (trial_dir / "server.argv.json").write_text(json.dumps(["python", "-m", "sglang.launch_server", "--port", "1"]))
    (trial_dir / "bench-decode.jsonl").write_text(json.dumps({"output_throughput": 40.0 + number}) + "\n")
    (trial_dir / "unrelated.bin").write_bytes(b"\0")


def new_study(tmp_path: Path) -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="t", storage=url, directions=["maximize"])
    study.set_user_attr(STUDY_ATTR_SPACE, {"objectives": [KEY]})
    return study, url


def add_trial(study: optuna.Study, studies: Path, value: float, *, upload: bool, baseline: bool = False) -> optuna.Trial:
    # a configuration of its own: two sampled alike would be one configuration measured twice
    study.enqueue_trial({"kt-num-gpu-experts": 8 * len(study.trials)})
    trial = study.ask(DIST)
    trial_dir = studies / "t" / f"trial-{trial.number}"
    write_trial_files(trial_dir, trial.number)
    for k, v in {ATTR_LAUNCHED: True, ATTR_TRIAL_DIR: str(trial_dir), METRIC_PREFIX + KEY: value,
                 ATTR_BASELINE: baseline or None}.items():
        if v is not None:
            trial.set_user_attr(k, v)
    if upload:
        assert len(upload_trial_artifacts(study, trial, trial_dir)) == 3  # the loop's call, before tell
    study.tell(trial, value)
    return trial


def test_upload_before_tell_uses_optunas_artifacts(tmp_path: Path) -> None:
    study, _ = new_study(tmp_path)
    add_trial(study, tmp_path / "studies", 40.0, upload=True)
    frozen = study.trials[0]
    metas = get_all_artifact_meta(frozen, storage=study._storage)
    assert sorted(m.filename for m in metas) == ["bench-decode.jsonl", "server.argv.json", "server.log"]
    store_dir = tmp_path / "studies" / "t" / "artifacts"
    assert study.user_attrs[STUDY_ATTR_ARTIFACT_DIR] == str(store_dir.resolve())
    log = next(m for m in metas if m.filename == "server.log")
    assert log.mimetype == "text/plain"
    download_artifact(artifact_store=open_store(store_dir), artifact_id=log.artifact_id, file_path=str(tmp_path / "dl"))
    assert (tmp_path / "dl").read_text().startswith("trial 0 log")


def test_finished_trials_are_backfilled_once(tmp_path: Path) -> None:
    study, _ = new_study(tmp_path)
    add_trial(study, tmp_path / "studies", 40.0, upload=True)
    add_trial(study, tmp_path / "studies", 41.0, upload=False)
    assert backfill_artifacts(study) == 3  # trial 1 only; trial 0 already has its files
    assert backfill_artifacts(study) == 0
    names = sorted(m["filename"] for m in list_artifacts(study, study.trials[1]))
    assert names == ["bench-decode.jsonl", "server.argv.json", "server.log"]


def test_large_logs_keep_head_and_tail(tmp_path: Path) -> None:
    study, _ = new_study(tmp_path)
    trial = study.ask(DIST)
    d = tmp_path / "studies" / "t" / "trial-0"
    d.mkdir(parents=True)
    (d / "server.log").write_text("HEAD\n" + "x" * 5000 + "\nTAIL-LINE\n")
    up = upload_trial_artifacts(study, trial, d, max_bytes=400)
    assert up[0].truncated
    meta = get_all_artifact_meta(trial, storage=study._storage)[0]
    download_artifact(artifact_store=open_store(d.parent / "artifacts"), artifact_id=meta.artifact_id,
                      file_path=str(tmp_path / "dl"))
    text = (tmp_path / "dl").read_text()
    assert text.startswith("HEAD") and text.endswith("TAIL-LINE\n") and "bytes cut" in text and len(text) < 600


def test_upload_failure_is_logged_not_raised(tmp_path: Path) -> None:
    study, _ = new_study(tmp_path)
    trial = study.ask(DIST)
    d = tmp_path / "studies" / "t" / "trial-0"
    write_trial_files(d, 0)
    (d.parent / "artifacts").write_text("a file where the store folder should be")
    logged: list[str] = []
    assert try_upload_trial_artifacts(study, trial, d, logged.append) == 0
    assert logged and "artifacts not uploaded" in logged[0]


def test_note_names_baseline_and_best(tmp_path: Path) -> None:
    from optuna_dashboard import get_note

    study, _ = new_study(tmp_path)
    add_trial(study, tmp_path / "studies", 40.0, upload=False, baseline=True)
    add_trial(study, tmp_path / "studies", 44.0, upload=False)
    body = note_baseline_and_best(study, ConfirmSpec())
    assert get_note(study) == body == study_note(study, ConfirmSpec())
    assert "trial 0: decode.output_throughput = 40" in body
    assert "trial 1: decode.output_throughput = 44 tok/s (vs baseline: decode.output_throughput +10.0%)" in body
    assert study.metric_names == [KEY]
    assert "Baseline" in get_note(optuna.Trial(study, study.trials[0]._trial_id))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def test_kttune_dashboard_serves_the_study_and_its_artifacts(tmp_path: Path) -> None:
    study, url = new_study(tmp_path)
    studies = tmp_path / "studies"
    add_trial(study, studies, 40.0, upload=True, baseline=True)  # uploaded by the loop
    add_trial(study, studies, 42.0, upload=False)  # backfilled by `kttune dashboard`
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "dashboard", "--space",
                             "search_spaces/sim-kimi-k2-thinking-8xl20.yaml", "--study", "t", "--storage", url,
                             "--studies-dir", str(studies), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                summaries = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.poll() is not None else ""  # type: ignore[union-attr]
                    pytest.fail(f"dashboard did not come up: {out[-2000:]}")
                time.sleep(0.3)
        sid = next(s["study_id"] for s in summaries if s["study_name"] == "t")
        detail = json.loads(_get(f"{base}/api/studies/{sid}"))
        assert "trial 1: decode.output_throughput = 42" in detail["note"]["body"]
        assert detail["objective_names"] == [KEY]
        assert len(detail["trials"]) == 2
        for t in detail["trials"]:
            arts = {a["filename"]: a for a in t["artifacts"]}
            assert set(arts) == {"server.log", "server.argv.json", "bench-decode.jsonl"}
            body = _get(f"{base}/artifacts/{sid}/{t['trial_id']}/{arts['server.log']['artifact_id']}").decode()
            assert body.startswith(f"trial {t['number']} log")
            argv = json.loads(_get(f"{base}/artifacts/{sid}/{t['trial_id']}/{arts['server.argv.json']['artifact_id']}"))
            assert argv[:3] == ["python", "-m", "sglang.launch_server"]
        assert b"<html" in _get(f"{base}/dashboard").lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
