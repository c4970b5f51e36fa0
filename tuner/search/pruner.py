"""Early stop: prune a launch whose probe workload measures far below the best probe so far."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState


class BelowBestPruner(optuna.pruners.BasePruner):
    """Prune a trial whose probe (its step-0 intermediate value) is below `ratio` × the best
    probe of the other trials (above best / ratio when minimizing), once `min_trials` others
    reported one. Relative to the best, not a percentile: with a budget of 20 most launches
    are near the incumbent, where a percentile would prune good configurations."""

    def __init__(self, ratio: float, min_trials: int = 2) -> None:
        self._ratio, self._min = ratio, min_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        mine = trial.intermediate_values.get(0)
        if mine is None or len(study.directions) != 1:
            return False
        others = [t.intermediate_values[0] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and 0 in t.intermediate_values
                  and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if len(others) < self._min:
            return False
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return mine < self._ratio * max(others)
        return mine > min(others) / self._ratio
