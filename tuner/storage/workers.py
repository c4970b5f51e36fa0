"""Several workers on one study: the baseline enqueued once, launches counted and claimed
against a shared budget, heartbeats while a launch runs, duplicates across workers, and
recovery of trials (and servers) that dead workers left behind."""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from tuner.config import SearchSpace
from tuner.log import Log
from tuner.storage.attrs import (
    ATTR_BASELINE,
    ATTR_DUPLICATE_OF,
    ATTR_LAUNCHED,
    ATTR_REASON,
    ATTR_TRIAL_DIR,
    ATTR_WORKER,
    is_interrupted,
)


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


class Heartbeat:
    """Records the trial's heartbeat while a launch runs (ask/tell has no built-in one)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                _heartbeat_storage(self._storage).record_heartbeat(self._trial_id)
            except Exception:  # a transient DB error must not kill the trial
                pass
            if self._stop.wait(_heartbeat_storage(self._storage).get_heartbeat_interval()):
                return

    def __enter__(self) -> Heartbeat:
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


def proposed_trials(study: optuna.Study, trial: optuna.Trial) -> list[FrozenTrial]:
    """The study's trials once every trial numbered below `trial` that another worker is still
    proposing has all of its params: Optuna writes a trial's params one suggestion at a time, so
    such a trial would hide a duplicate from :func:`find_duplicate`. Still proposing: running,
    some params missing, and started within the time a dead worker's trial takes to go stale
    (older, its worker died while asking). Waits no longer than that, beating this trial's
    heartbeat."""
    names, stale_s = set(trial.params), _stale_after_s(study)
    deadline = time.monotonic() + stale_s
    while True:
        trials = study.get_trials(deepcopy=False)
        now = datetime.datetime.now()
        proposing = [t for t in trials if t.number < trial.number and t.state == TrialState.RUNNING
                     and not names <= set(t.params) and t.datetime_start is not None
                     and (now - t.datetime_start).total_seconds() < stale_s]
        if not proposing or time.monotonic() >= deadline:
            return trials
        beat_once(study, trial)
        time.sleep(0.2)


def pruned_twin(trials: list[FrozenTrial], params: dict[str, Any]) -> FrozenTrial | None:
    return next((t for t in trials if t.state == TrialState.PRUNED and t.params == params), None)


def heartbeat_on(study: optuna.Study) -> bool:
    return optuna.storages._heartbeat.is_heartbeat_enabled(study._storage)


def heartbeat_interval_s(study: optuna.Study) -> float:
    """The storage's heartbeat interval (only for storages with heartbeats on)."""
    return float(_heartbeat_storage(study._storage).get_heartbeat_interval() or 0)


def _heartbeat_storage(storage: optuna.storages.BaseStorage) -> BaseHeartbeat:
    if not isinstance(storage, BaseHeartbeat):
        raise TypeError(f"{type(storage).__name__} has no heartbeats")
    return storage


def beat_once(study: optuna.Study, trial: optuna.Trial) -> None:
    """One heartbeat for a trial not launched yet: Optuna fails only trials that have beaten,
    so a worker that dies before its launch must not leave a trial that never goes stale."""
    if heartbeat_on(study):
        _heartbeat_storage(study._storage).record_heartbeat(trial._trial_id)


def _stale_after_s(study: optuna.Study) -> float:
    """How long a trial may go without a heartbeat before a worker's check fails it."""
    if not heartbeat_on(study):
        return 0.0
    interval = heartbeat_interval_s(study)
    backend = getattr(study._storage, "_backend", study._storage)  # Optuna caches an RDBStorage
    return float((getattr(backend, "grace_period", None) or 2 * interval) + interval)


def claim_launch(study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
    """Whether this trial may launch within a budget that other workers share.

    Trial numbers are handed out under a lock on the study row, so a trial may launch when the
    trials numbered below it, launched or still deciding, leave room: every worker applies the
    same rule and the lower number wins. While lower trials decide, wait (beating this one's
    heartbeat); one still undecided after the heartbeat's grace period is taken as dead."""
    deadline = time.monotonic() + _stale_after_s(study)
    while True:
        trials = study.get_trials(deepcopy=False)
        if launched_count(trials, before=trial.number) >= budget:
            return False
        if launched_count(trials, before=trial.number, undecided=True) < budget or time.monotonic() >= deadline:
            return True
        beat_once(study, trial)
        time.sleep(1.0)
        optuna.storages.fail_stale_trials(study)
