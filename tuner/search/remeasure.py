"""Re-measurements under noise: which configuration to launch again, and the one place
they are enqueued. A narrow leader is re-checked during the search (so the local search does
not build on one lucky run); the finalists are confirmed in the budget's last launches."""
from __future__ import annotations

import math
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.config import ConfirmSpec
from tuner.selection import pooled_noise, repeat_groups, starting_reliably
from tuner.storage import ATTR_CONFIRMATION_OF, ATTR_LAUNCHED


def leader_to_recheck(study: optuna.Study, prior_noise: float, z: float = 1.0) -> FrozenTrial | None:
    """Of the two best configurations, the one measured once, when the leader leads by less
    than `z` standard errors of the difference (noise from :func:`pooled_noise`): the local
    search would otherwise build on one lucky run, or drop the better configuration for one
    unlucky run. The leader first when both were measured once. A leader whose result may
    depend on its KV pool's start-up draw (`Repeats.eligible`) is re-launched whatever its lead.
    Single objective only."""
    groups = repeat_groups(study)
    if groups and not groups[0].eligible:
        return groups[0].first
    if len(groups) < 2 or min(groups[0].score, groups[1].score) <= 0:
        return None
    top, runner = groups[0], groups[1]
    once = [g for g in (top, runner) if len(g.values) == 1]
    if not once:
        return None
    sigma = pooled_noise(groups, prior_noise)
    lead = abs(math.log(top.score) - math.log(runner.score))
    se = sigma * math.sqrt(1.0 / len(top.values) + 1.0 / len(runner.values))
    return once[0].first if lead < z * se else None


def next_confirmation(study: optuna.Study, finalists: int) -> FrozenTrial | None:
    """The finalist (top `finalists` by score, those that would not start reliably left out
    where others are there) with the fewest measurements, counting
    confirmations other workers have queued or are running; ties go to the better score."""
    groups = starting_reliably(repeat_groups(study))[:finalists]
    if not groups:
        return None
    pending: dict[int, int] = {}
    for t in study.get_trials(deepcopy=False):
        of = t.user_attrs.get(ATTR_CONFIRMATION_OF)
        if of is not None and not t.state.is_finished():
            pending[of] = pending.get(of, 0) + 1
    return min(groups, key=lambda g: len(g.values) + pending.get(g.first.number, 0)).first


def _queue(study: optuna.Study, choose: Callable[[optuna.Study], FrozenTrial | None]) -> None:
    """Enqueue a re-measurement of the trial `choose` names (a finalist, a narrow leader),
    unless one is already queued (by this or another worker)."""
    if any(t.state == TrialState.WAITING and t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None
           for t in study.get_trials(deepcopy=False)):
        return
    target = choose(study)
    if target is not None:
        study.enqueue_trial(dict(target.params), user_attrs={ATTR_CONFIRMATION_OF: target.number})


def queue_remeasurement(study: optuna.Study, confirm: ConfirmSpec, *, confirming: bool, confirm_runs: int) -> None:
    """Enqueue the next re-measurement, if any: while `confirming` (the budget's last
    `confirm_runs` launches) the finalist with the fewest measurements; before that, a leader
    that leads by less than the noise (when confirmations and re-checks are on)."""
    if confirming:
        _queue(study, lambda s: next_confirmation(s, confirm.finalists))
    elif confirm_runs and confirm.recheck:
        _queue(study, lambda s: leader_to_recheck(s, confirm.noise))


def enqueue_confirmations(study: optuna.Study, trial_number: int, runs: int) -> FrozenTrial:
    """Enqueue `runs` re-launches of trial `trial_number`'s configuration as confirmations of
    it (what `kttune remeasure` adds); returns that trial. Raises ValueError when the trial
    was never launched."""
    target = next((t for t in study.get_trials(deepcopy=False) if t.number == trial_number), None)
    if target is None or not target.params or not target.user_attrs.get(ATTR_LAUNCHED):
        raise ValueError(f"trial {trial_number} is not a launched trial of study {study.study_name}")
    of = target.user_attrs.get(ATTR_CONFIRMATION_OF, target.number)
    for _ in range(runs):
        study.enqueue_trial(dict(target.params), user_attrs={ATTR_CONFIRMATION_OF: of})
    return target
