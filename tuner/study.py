"""The tuning loop: an Optuna ask/tell study whose budget counts real server launches.

Optuna's RDB storage is the system of record: every proposal, verdict, metric and file path
lives there (or in the trial folder it names), so `kttune run` resumes where it stopped and
several workers can share one study.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError, KttuneError
from tuner.objective import TrialOutcome
from tuner.space import ConfirmSpec, SearchSpace

# User-attribute keys (kttune's part of the storage schema).
ATTR_LAUNCHED = "launched"
ATTR_REASON = "reason"
ATTR_MESSAGE = "message"
ATTR_TRIAL_DIR = "trial_dir"
ATTR_WORKER = "worker"
ATTR_FLAGS = "flags"
ATTR_BASELINE = "baseline"
ATTR_DUPLICATE_OF = "duplicate_of"
ATTR_SPARE_GB = "spare_gpu_mem_gb"  # predicted GPU memory to spare at launch (without the safety margin)
ATTR_MARGINAL = "inside_margin"  # launched although predicted to fit only inside the safety margin
METRIC_PREFIX = "m:"
CONSTRAINT_PREFIX = "c:"
STUDY_ATTR_SPACE = "kttune:space"
STUDY_ATTR_CALIBRATION = "kttune:memory_calibration"
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120

Log = Callable[[str], None]


def default_storage(study_name: str, studies_dir: Path) -> str:
    studies_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{studies_dir / (study_name + '.db')}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so a dead worker's RUNNING trial is failed, not lost.

    KTTUNE_HEARTBEAT_S sets the heartbeat interval in whole seconds (default 30); a trial whose
    heartbeat is older than 4 intervals counts as dead. Several workers may open a new database
    at once: the schema creation that loses that race is retried."""
    import importlib.util
    import time

    import sqlalchemy.exc

    if "://" not in url:
        raise ConfigError(f"--storage: {url!r} is not a SQLAlchemy URL; use e.g. sqlite:///studies/x.db or postgresql://user@host/db")
    raw = os.environ.get("KTTUNE_HEARTBEAT_S", "").strip()
    interval = HEARTBEAT_INTERVAL_S
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"KTTUNE_HEARTBEAT_S: must be a whole number of seconds ≥ 1, got {raw!r}")
        interval = int(raw)
    grace = interval * HEARTBEAT_GRACE_S // HEARTBEAT_INTERVAL_S
    # A server on another host may drop idle connections during a long trial: test before use.
    engine_kwargs = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
    scheme = url.split("://")[0]
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        # SQLAlchemy ≥ 2.1 reads a bare postgresql:// as psycopg 3; use psycopg2 if that is what is installed.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    attempt = 0
    while True:
        attempt += 1
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=dict(engine_kwargs), heartbeat_interval=interval,
                                              grace_period=grace)
        except ImportError as exc:
            hint = "psycopg2-binary" if scheme.startswith("postgresql") else "the driver it names"
            raise ConfigError(f"--storage: the driver for {scheme} is not installed ({exc}); pip install {hint}") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                optuna.exceptions.StorageInternalError) as exc:
            # Another worker created the tables or the version row between our check and our
            # insert; a second look finds them. Anything else (e.g. no right to create tables) stays.
            if attempt < 5:
                time.sleep(0.2 * attempt)
                continue
            raise ConfigError(f"--storage: cannot set up the tables in {url!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); the database user must own the database") from None
        except Exception as exc:  # sqlalchemy raises many kinds for a bad URL / unreachable server
            raise ConfigError(f"--storage: cannot open {url!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); check the URL and that the database is reachable") from None


def make_sampler(space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    """kttune's search strategy (tuner/strategy.py; measured in docs/tuning-quality.md)."""
    from tuner.strategy import make_sampler as strategy_sampler

    return strategy_sampler(space, seed)


def open_study(space: SearchSpace, *, study_name: str, storage: str | optuna.storages.BaseStorage,
               seed: int | None) -> optuna.Study:
    store = make_storage(storage) if isinstance(storage, str) else storage
    study = optuna.create_study(study_name=study_name, storage=store, directions=space.directions,
                                sampler=make_sampler(space, seed), load_if_exists=True)
    if len(study.directions) != len(space.objectives):
        raise ConfigError(f"--study: {study_name!r} already exists with {len(study.directions)} objective(s), the space has {len(space.objectives)}; use another --study name")
    if STUDY_ATTR_SPACE not in study.user_attrs:
        study.set_user_attr(STUDY_ATTR_SPACE, {"name": space.name, "path": str(space.path) if space.path else None,
                                                "objectives": [o.key for o in space.objectives]})
    return study


def enqueue_baseline_once(study: optuna.Study, space: SearchSpace) -> bool:
    """Enqueue the space's baseline unless it is queued, running or measured; True if this
    call did. A baseline whose launch failed (its worker died) is enqueued again.

    A check-then-enqueue is not atomic across workers that start together. So each enqueues
    when it sees no baseline, then looks again: trial numbers are handed out under a lock on
    the study row, every worker sees the same lowest-numbered baseline, and the others withdraw
    theirs. One that another worker has already taken is caught by `find_duplicate` (a lower
    trial with the same params) and not launched."""
    if space.baseline is None:
        return False

    def live_baselines() -> list[FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get(ATTR_BASELINE) and t.state != TrialState.FAIL]

    if live_baselines():
        return False
    storage = study._storage
    # What Study.enqueue_trial stores, through the storage call that returns the trial's id.
    mine = storage.create_new_trial(study._study_id, template_trial=optuna.trial.create_trial(
        state=TrialState.WAITING, system_attrs={"fixed_params": dict(space.baseline)},
        user_attrs={ATTR_BASELINE: True}))
    first = min(live_baselines(), key=lambda t: t.number)
    if first._trial_id == mine:
        return True
    try:
        if storage.set_trial_state_values(mine, TrialState.RUNNING):  # atomic: WAITING only
            storage.set_trial_user_attr(mine, ATTR_BASELINE, False)
            storage.set_trial_user_attr(mine, ATTR_REASON, "duplicate")
            storage.set_trial_user_attr(mine, ATTR_DUPLICATE_OF, first.number)
            storage.set_trial_state_values(mine, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    return False


def launched_count(trials: list[FrozenTrial], *, before: int | None = None, undecided: bool = False) -> int:
    """Launches that count against the budget: finished ones plus those still running.
    A launch cut short by the tuner's own death ('interrupted') is not counted.

    Workers sharing a study claim launches without a lock: trial numbers are handed out in
    order, so trial k may launch if the trials numbered below it (`before=k`) leave room.
    `undecided=True` also counts those that may still launch (WAITING, or RUNNING and not yet
    marked launched): their workers apply the same rule, so the lower number wins."""
    n = 0
    for t in trials:
        if before is not None and t.number >= before:
            continue
        if t.user_attrs.get(ATTR_LAUNCHED):
            n += not is_interrupted(t)
        elif undecided and t.state in (TrialState.RUNNING, TrialState.WAITING):
            n += 1
    return n


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: optuna.Study, log: Log) -> int:
    """Fail RUNNING trials whose worker is gone and kill the servers they left behind.

    Same host: the worker's pid is dead, and the trial is named 'interrupted' before it is
    failed (finished trials are read-only). Other hosts: Optuna's heartbeat fails them; a
    launched FAIL trial without a reason reads as interrupted."""
    from tuner.server import kill_orphan

    optuna.storages.fail_stale_trials(study)
    storage = study._storage
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False):
        w_host, _, w_pid = str(t.user_attrs.get(ATTR_WORKER, "")).rpartition(":")
        if t.state == TrialState.RUNNING and w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid)):
            try:
                storage.set_trial_user_attr(t._trial_id, ATTR_REASON, "interrupted")
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker recovered it first
            recovered += 1
        elif not (t.state == TrialState.FAIL and is_interrupted(t)):
            continue
        trial_dir = t.user_attrs.get(ATTR_TRIAL_DIR)
        if trial_dir and kill_orphan(Path(trial_dir) / "server.pid"):
            log(f"trial {t.number}: killed the server its dead worker left behind")
    return recovered


def boundary_failures(trials: list[FrozenTrial]) -> int:
    """Launches inside the safety margin (ATTR_MARGINAL) that failed for their configuration."""
    return sum(1 for t in trials if t.user_attrs.get(ATTR_MARGINAL) and t.user_attrs.get(ATTR_LAUNCHED)
               and t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_REASON))


def is_interrupted(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and bool(t.user_attrs.get(ATTR_LAUNCHED)) and \
        t.user_attrs.get(ATTR_REASON) in (None, "interrupted")


class _Heartbeat:
    """Records the trial's heartbeat while a launch runs (ask/tell has no built-in one)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
            except Exception:  # a transient DB error must not kill the trial
                pass
            if self._stop.wait(self._storage.get_heartbeat_interval()):
                return

    def __enter__(self) -> _Heartbeat:
        if optuna.storages._heartbeat.is_heartbeat_enabled(self._storage):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def find_duplicate(trials: list[FrozenTrial], params: Mapping[str, Any], *,
                   before: int | None = None) -> FrozenTrial | None:
    """A trial with exactly these params whose launch makes this one a waste: a finished,
    launched one (preferred: its measurement can be reused), or with `before=k` a trial
    numbered below k that is still running or deciding (another worker's; the lower wins)."""
    wanted = dict(params)
    pending = None
    for t in trials:
        if t.params != wanted:
            continue
        if t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_LAUNCHED):
            return t
        if pending is None and before is not None and t.number < before and t.state == TrialState.RUNNING:
            pending = t
    return pending


def record(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, attrs: Mapping[str, Any]) -> None:
    """Store attrs, metrics and constraints, then tell the verdict. Constraints are mirrored
    as user attrs (`c:<name>`) because optuna-dashboard shows those, not Optuna 5's own."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in outcome.metrics.items():
            trial.set_user_attr(METRIC_PREFIX + key, value)
        trial.set_user_attr(ATTR_REASON, outcome.reason)
        trial.set_user_attr(ATTR_MESSAGE, outcome.message[-2000:])
        for key, value in outcome.constraints.items():
            trial.set_constraint(key, value)
            trial.set_user_attr(CONSTRAINT_PREFIX + key, value)
        study.tell(trial, outcome.values, state=outcome.state)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise KttuneError(f"trial {trial.number} was already failed by another worker: this worker's heartbeat "
                          "stopped for longer than the grace period (a suspended machine or a database outage); "
                          "its result is lost, run `kttune run` again to continue the study") from None


@dataclass
class RunSummary:
    study_name: str
    storage: str
    launched: int
    budget: int
    new_trials: list[int] = field(default_factory=list)
    stopped_reason: str | None = None


def metrics_of(t: FrozenTrial) -> dict[str, float]:
    return {k[len(METRIC_PREFIX):]: v for k, v in t.user_attrs.items() if k.startswith(METRIC_PREFIX)}


def confirmed_or_best(study: optuna.Study, prior_noise: float = ConfirmSpec.noise) -> list[FrozenTrial]:
    """best_trials; with one objective, the launched configuration with the best mean over its
    measurements (confirmation runs re-measure finalists), as its first trial — so a lucky
    single run does not win, and a duplicate answered from a measurement does not tie; among
    configurations tied with it, the one with the most GPU memory to spare (strategy.pick_group)."""
    from tuner.strategy import pick_group, repeat_groups

    groups = repeat_groups(study)
    pick = pick_group(groups, prior_noise)
    return [pick.first] if pick is not None else best_trials(study)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible best trial(s): the Pareto front for several objectives."""
    try:
        return list(study.best_trials)
    except ValueError:
        return []


