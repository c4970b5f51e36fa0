"""The rules several workers of one study follow (tuner.storage.workers), on hand-made
trials and local SQLite studies: launches claimed in trial-number order, duplicates, the
baseline enqueued once, the heartbeat interval."""

import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from tests.conftest import REPO
from tuner.config import SearchSpace, load_space
from tuner.errors import ConfigError
from tuner.search.sampler import make_sampler
from tuner.storage.attrs import ATTR_BASELINE, ATTR_DUPLICATE_OF, ATTR_LAUNCHED, ATTR_REASON
from tuner.storage.open import make_storage, open_study
from tuner.storage.workers import enqueue_baseline_once, find_duplicate, launched_count

HEARTBEAT_S = 2  # grace: 4 beats = 8 s
PARAMS = {"a": 1, "b": 2}


def trial(number: int, state: TrialState, *, launched: bool = False, reason: str | None = None,
          params: dict[str, int] | None = None) -> FrozenTrial:
    attrs: dict[str, object] = {ATTR_LAUNCHED: True} if launched else {}
    if reason is not None:
        attrs[ATTR_REASON] = reason
    p = dict(PARAMS if params is None else params)
    return FrozenTrial(number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None,
                       datetime_start=None, datetime_complete=None, params=p,
                       distributions={k: optuna.distributions.IntDistribution(0, 10) for k in p},
                       user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number + 100)


def test_launches_are_claimed_in_trial_number_order() -> None:
    trials = [trial(0, TrialState.COMPLETE, launched=True),
              trial(1, TrialState.RUNNING, launched=True),           # launched, still running
              trial(2, TrialState.RUNNING),                          # deciding: may still launch
              trial(3, TrialState.FAIL, launched=True),              # interrupted: not counted
              trial(4, TrialState.FAIL, launched=True, reason="bench_failed"),  # a real launch
              trial(5, TrialState.COMPLETE, reason="infeasible_predicted"),  # never launched
              trial(6, TrialState.WAITING),                          # queued: may still launch
              trial(7, TrialState.RUNNING)]                          # the worker's own trial
    assert launched_count(trials) == 3
    assert launched_count(trials, before=7) == 3
    assert launched_count(trials, before=7, undecided=True) == 5
    # One launch left (budget 4): trial 2 sees room below itself and may take it, whatever
    # trial 7's worker does; trial 7 sees 3 launched + 2 undecided below it and must wait.
    assert launched_count(trials, before=2, undecided=True) == 2
    assert launched_count(trials, before=2) == 2


def test_duplicates_are_finished_measurements_or_lower_running_trials() -> None:
    other = {"a": 9, "b": 9}
    running_low = trial(1, TrialState.RUNNING, launched=True)
    measured = trial(4, TrialState.COMPLETE, launched=True)
    assert find_duplicate([running_low, measured], PARAMS, before=3) is measured  # reuse the measurement
    assert find_duplicate([running_low], PARAMS, before=3) is running_low
    assert find_duplicate([running_low], PARAMS) is None  # a lone worker only reuses measurements
    assert find_duplicate([trial(5, TrialState.RUNNING)], PARAMS, before=3) is None  # the higher one yields
    assert find_duplicate([trial(1, TrialState.FAIL, launched=True)], PARAMS, before=3) is None  # interrupted: rerun
    assert find_duplicate([trial(1, TrialState.RUNNING, params=other)], PARAMS, before=3) is None


def _sqlite_study(tmp_path: Path) -> tuple[optuna.Study, optuna.Study, SearchSpace]:
    space = load_space(REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml", check_paths=False)
    storage = make_storage(f"sqlite:///{tmp_path / 'race.db'}")
    one = open_study(space, study_name="race", storage=storage, sampler=make_sampler(space, 0))
    two = open_study(space, study_name="race", storage=storage, sampler=make_sampler(space, 0))  # another worker: its own cache
    return one, two, space


def test_baseline_enqueued_once_when_two_workers_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two, space = _sqlite_study(tmp_path)
    assert enqueue_baseline_once(one, space) is True
    # Worker two looked before worker one's enqueue landed: it enqueues too, then withdraws.
    real = two.get_trials
    looks: list[int] = []

    def stale_first_look(**kw: object) -> list[FrozenTrial]:
        looks.append(1)
        return [] if len(looks) == 1 else real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(two, "get_trials", stale_first_look)
    assert enqueue_baseline_once(two, space) is False
    first, second = one.get_trials()
    assert first.state == TrialState.WAITING and first.user_attrs[ATTR_BASELINE] is True
    assert second.state == TrialState.FAIL and second.user_attrs[ATTR_DUPLICATE_OF] == 0
    assert second.user_attrs[ATTR_BASELINE] is False
    assert enqueue_baseline_once(two, space) is False  # seen now: nothing more
    popped = one.ask(space.distributions())
    assert popped.number == 0 and popped.params == dict(space.baseline)


def test_baseline_enqueued_again_when_its_launch_was_lost(tmp_path: Path) -> None:
    one, _, space = _sqlite_study(tmp_path)
    assert enqueue_baseline_once(one, space)
    lost = one.ask(space.distributions())
    lost.set_user_attr(ATTR_LAUNCHED, True)
    one.tell(lost, state=TrialState.FAIL)  # what the heartbeat does to a dead worker's trial
    assert enqueue_baseline_once(one, space) is True
    again = one.ask(space.distributions())
    assert again.number == 1 and again.user_attrs[ATTR_BASELINE] is True and again.params == lost.params


@pytest.mark.parametrize("lower_launches", [True, False])
def test_last_launch_goes_to_the_lower_trial(tmp_path: Path, lower_launches: bool) -> None:
    """Two workers each hold a proposal when one launch is left: the higher-numbered one
    waits for the lower one to decide, and launches only if that one did not."""
    from tuner.storage.workers import claim_launch

    one, two, space = _sqlite_study(tmp_path)
    low, high = one.ask(space.distributions()), two.ask(space.distributions())
    verdict: list[bool] = []
    waiter = threading.Thread(target=lambda: verdict.append(claim_launch(two, high, 1)))
    waiter.start()
    time.sleep(1.5)
    assert verdict == []  # still waiting: trial 0 may take the launch
    if lower_launches:
        assert claim_launch(one, low, 1) is True
        low.set_user_attr(ATTR_LAUNCHED, True)
    else:  # e.g. predicted infeasible: told without a launch
        one.tell(low, [0.0])
    waiter.join(timeout=30)
    assert verdict == [not lower_launches]


def _suggest_all(trial: optuna.Trial, space: SearchSpace) -> None:
    for name, dist in space.distributions().items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
        else:
            assert isinstance(dist, optuna.distributions.IntDistribution)
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)


def test_a_duplicate_still_being_proposed_by_another_worker_is_waited_for(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna writes a trial's params one suggestion at a time: a lower trial whose worker is
    still proposing the same configuration must not be missed for want of its params."""
    from tuner.storage import workers

    one, two, space = _sqlite_study(tmp_path)
    assert space.baseline is not None
    for study in (one, two):
        study.enqueue_trial(dict(space.baseline))
    low = one.ask()  # worker one: trial 0 created, its params not written yet
    high = two.ask(space.distributions())  # worker two: trial 1, the same params, already written
    found: list[FrozenTrial | None] = []
    waiter = threading.Thread(target=lambda: found.append(
        find_duplicate(workers.proposed_trials(two, high), high.params, before=high.number)))
    waiter.start()
    time.sleep(1.0)
    assert found == []  # still waiting for trial 0's params
    _suggest_all(low, space)
    waiter.join(timeout=30)
    assert found and found[0] is not None and found[0].number == low.number
    # A trial left without params for longer than a dead worker's takes to go stale is not waited for.
    monkeypatch.setattr(workers, "_stale_after_s", lambda study: 0.5)
    one.enqueue_trial(dict(space.baseline))
    dead = one.ask()
    time.sleep(0.6)
    later = two.ask(space.distributions())
    started = time.monotonic()  # only the look is timed: waiting would take the whole 0.5 s
    assert dead.number < later.number and workers.proposed_trials(two, later) and time.monotonic() - started < 0.5


def test_heartbeat_interval_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'hb.db'}"
    assert make_storage(url).get_heartbeat_interval() == 30
    monkeypatch.setenv("KTTUNE_HEARTBEAT_S", "3")
    storage = make_storage(url)
    assert storage.get_heartbeat_interval() == 3 and storage.grace_period == 12
    for bad in ("0", "1.5", "soon"):
        monkeypatch.setenv("KTTUNE_HEARTBEAT_S", bad)
        with pytest.raises(ConfigError, match="KTTUNE_HEARTBEAT_S"):
            make_storage(url)


def test_a_long_message_keeps_its_head_and_tail() -> None:
    from tuner.storage.record import MESSAGE_HEAD, MESSAGE_TAIL, stored_message

    short = "port 127.0.0.1:30000 is already in use"
    assert stored_message(short) == short
    lines = ["RuntimeError: the decisive first line"] + [f"log line {i:04d} of the server" for i in range(400)]
    kept = stored_message("\n".join(lines))
    assert kept.startswith("RuntimeError: the decisive first line\n") and kept.endswith("log line 0399 of the server")
    assert "characters left out" in kept and len(kept) <= MESSAGE_HEAD + MESSAGE_TAIL + 60
    assert all(line in lines or "left out" in line for line in kept.splitlines())  # whole lines only
