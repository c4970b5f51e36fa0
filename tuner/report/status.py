"""A trial's status as reports show it (feasible, violates, infeasible, failed, duplicate,
running, pruned), counts of failures and violations, and why there is no feasible trial."""
from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.config import is_finite
from tuner.outcome import PRUNED, decisive
from tuner.storage import ATTR_DUPLICATE_OF, ATTR_MESSAGE, ATTR_REASON

# Trial statuses as the report sees them.
FEASIBLE = "feasible"  # measured, every constraint (SLOs included) met
VIOLATES = "violates"  # measured, but a constraint (an SLO, a predicted limit) is > 0
INFEASIBLE = "infeasible"  # the configuration did not run: predicted not to fit, OOM, crash
FAILED = "failed"  # infrastructure fault or interrupted (Optuna FAIL)
DUPLICATE = "duplicate"  # same params as a measured trial; no measurement of its own
RUNNING = "running"


def violated_constraints(t: FrozenTrial) -> dict[str, float]:
    """Constraints of the trial that are not met (value > 0)."""
    return {k: float(v) for k, v in t.constraints.items() if is_finite(v) and v > 0}


def classify_trial(t: FrozenTrial) -> str:
    if t.state in (TrialState.RUNNING, TrialState.WAITING):
        return RUNNING
    if t.user_attrs.get(ATTR_DUPLICATE_OF) is not None:  # told with the copy's verdict, or withdrawn (FAIL)
        return DUPLICATE
    if t.state == TrialState.PRUNED:
        return PRUNED
    if t.state == TrialState.FAIL:
        return FAILED
    if t.user_attrs.get(ATTR_REASON):
        return INFEASIBLE
    return VIOLATES if violated_constraints(t) else FEASIBLE


def failure_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        reason = t.user_attrs.get(ATTR_REASON)
        if reason and t.user_attrs.get(ATTR_DUPLICATE_OF) is None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def failure_lines(study: optuna.Study, numbers: Sequence[int] | None = None) -> list[str]:
    """"trial N: reason: the decisive line" for each failed trial (of `numbers` where given),
    what a user reads first to know why a launch gave nothing."""
    out = []
    for t in study.get_trials(deepcopy=False):
        reason = t.user_attrs.get(ATTR_REASON)
        if reason and (numbers is None or t.number in numbers) and t.user_attrs.get(ATTR_DUPLICATE_OF) is None:
            line = decisive(str(t.user_attrs.get(ATTR_MESSAGE) or ""))
            out.append(f"trial {t.number}: {reason}" + (f": {line}" if line else ""))
    return out


def violation_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """How many measured (launched, not failed) trials missed each constraint."""
    counts: dict[str, int] = {}
    for t in trials:
        if classify_trial(t) == VIOLATES:
            for name in violated_constraints(t):
                counts[name] = counts.get(name, 0) + 1
    return counts


def no_feasible_message(study: optuna.Study) -> str:
    """Why there is no best trial: nothing measured yet, or which constraints every measured
    trial missed and the trial that came closest."""
    trials = study.get_trials(deepcopy=False)
    measured = [t for t in trials if classify_trial(t) in (FEASIBLE, VIOLATES)]
    if not measured:
        return "no trial has been measured yet; run (more) trials"
    counts = violation_counts(measured)
    closest = min(measured, key=lambda t: sum(violated_constraints(t).values()))
    missed = ", ".join(f"{k} by {v:.3g}" for k, v in sorted(violated_constraints(closest).items()))
    per = ", ".join(f"{k} ({n} of {len(measured)})" for k, n in sorted(counts.items()))
    return (f"no measured trial meets every constraint: missed {per}; closest is trial {closest.number} "
            f"(missed {missed}; SLO values are the fraction by which the bound was missed). "
            "Relax the SLO or widen the space, or export a trial anyway with --trial N")
