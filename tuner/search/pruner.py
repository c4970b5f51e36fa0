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

    def threshold(self, study: optuna.Study, number: int) -> float | None:
        """The probe value trial `number` must reach (maximizing; not exceed when minimizing), or None
        while fewer than `min_trials` others reported a probe."""
        if len(study.directions) != 1:
            return None
        others = [t.intermediate_values[0] for t in study.get_trials(deepcopy=False)
                  if t.number != number and 0 in t.intermediate_values
                  and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if len(others) < self._min:
            return None
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return self._ratio * max(others)
        return min(others) / self._ratio

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        mine = trial.intermediate_values.get(0)
        bound = self.threshold(study, trial.number)
        if mine is None or bound is None:
            return False
        return mine < bound if study.direction == optuna.study.StudyDirection.MAXIMIZE else mine > bound
