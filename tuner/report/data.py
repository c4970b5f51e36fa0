"""The data behind `kttune report`, computed from storage alone (rendered by
`tuner.report.html`, so tests check numbers rather than pixels): trial rows, the pick, the
baseline comparison, importances, status and failure counts."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from tuner.config import SearchSpace, is_finite
from tuner.report.comparison import Comparison, compare, gain_verdict
from tuner.report.status import (
    FEASIBLE,
    VIOLATES,
    classify_trial,
    failure_counts,
    no_feasible_message,
    violated_constraints,
    violation_counts,
)
from tuner.selection import (
    best_trials,
    pick,
    pick_by_weights,
)
from tuner.storage import ATTR_BASELINE, ATTR_REASON, metrics_of, wall_s_of


@dataclass(frozen=True)
class TrialRow:
    number: int
    status: str
    reason: str | None
    baseline: bool
    params: dict[str, Any]
    metrics: dict[str, float]
    violated: dict[str, float]
    wall_s: float | None


@dataclass(frozen=True)
class Objective:
    key: str
    direction: str


@dataclass(frozen=True)
class Importance:
    objective: str
    evaluator: str | None
    values: dict[str, float]  # param → importance (sums to 1), most important first
    note: str = ""


@dataclass(frozen=True)
class ReportData:
    study_name: str
    space_name: str
    objectives: tuple[Objective, ...]
    params: tuple[str, ...]
    choices: dict[str, tuple[Any, ...]]  # categorical knobs and their choices, in the space's order
    slos: tuple[str, ...]
    trials: tuple[TrialRow, ...]
    front: tuple[int, ...]  # feasible best trial(s): the Pareto front with several objectives
    recommended: int | None  # the best trial, or the equal-weights pick on the front
    baseline: int | None
    comparison: tuple[Comparison, ...]
    importances: tuple[Importance, ...]
    status_counts: dict[str, int]
    failure_counts: dict[str, int]
    violation_counts: dict[str, int]
    elapsed_s: float | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    keep_baseline: str = ""  # why the pick is not recommended over the baseline; "" when it is

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def row(self, number: int) -> TrialRow:
        return next(r for r in self.trials if r.number == number)

    def measured(self, objective: str) -> list[TrialRow]:
        """Trials with a measured value for this objective key (feasible or not)."""
        return [r for r in self.trials if r.status in (FEASIBLE, VIOLATES) and objective in r.metrics]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _trial_row(t: FrozenTrial) -> TrialRow:
    return TrialRow(number=t.number, status=classify_trial(t), reason=t.user_attrs.get(ATTR_REASON),
                    baseline=bool(t.user_attrs.get(ATTR_BASELINE)), params=dict(t.params),
                    metrics=metrics_of(t), violated=violated_constraints(t),
                    wall_s=wall_s_of(t))


def choose_evaluator(n_trials: int) -> optuna.importance.BaseImportanceEvaluator:
    """fANOVA (Optuna's default; random forests, needs scikit-learn) when available. Else
    PED-ANOVA with a top quantile that holds ≥ 5 trials: its default 10 % is one or two
    trials in a 20-launch study, too few to tell the knobs apart."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 5 / max(n_trials, 1))))
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


# Fewer feasible measured trials than this and an importance ranking is decided by single
# trials: fANOVA's forest (and PED-ANOVA's top quantile) then rank the run-to-run noise.
MIN_IMPORTANCE_TRIALS = 10


def _importance(trials: Sequence[FrozenTrial], key: str, direction: str, params: Sequence[str]) -> Importance:
    """Importances of the knobs that took more than one value, for one measured metric, over
    feasible measured trials only (the pessimistic placeholder values of configurations that
    never ran would swamp the signal); with too few trials, none, and the note says why."""
    usable = [t for t in trials if classify_trial(t) == FEASIBLE and is_finite(metrics_of(t).get(key))]
    varying = [p for p in params if len({repr(t.params.get(p)) for t in usable if p in t.params}) > 1]
    fixed = [p for p in params if p not in varying]
    if len(usable) < MIN_IMPORTANCE_TRIALS or not varying:
        why = (f"{len(usable)} feasible measured trial(s); a ranking needs ≥ {MIN_IMPORTANCE_TRIALS}, fewer rank the "
               "run-to-run noise" if len(usable) < MIN_IMPORTANCE_TRIALS else "no knob took more than one value")
        return Importance(key, None, {}, f"not computed: {why}")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        tmp = optuna.create_study(direction=StudyDirection[direction.upper()])
    finally:
        optuna.logging.set_verbosity(verbosity)
    for t in usable:
        tmp.add_trial(optuna.trial.create_trial(params={p: t.params[p] for p in varying if p in t.params},
                                                distributions={p: t.distributions[p] for p in varying if p in t.params},
                                                value=float(metrics_of(t)[key])))
    evaluator = choose_evaluator(len(usable))
    name = type(evaluator).__name__.replace("ImportanceEvaluator", "")
    try:
        values = optuna.importance.get_param_importances(tmp, evaluator=evaluator)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return Importance(key, name, {}, f"{name} failed: {exc}")
    ordered = dict(sorted(((p, float(v)) for p, v in values.items()), key=lambda kv: -kv[1]))
    note = "" if any(ordered.values()) else "no knob explains the spread"
    if fixed:
        note = "; ".join(filter(None, [note, f"left out, one value in every measured trial: {', '.join(fixed)}"]))
    return Importance(key, name, ordered, note)


def _elapsed(trials: Sequence[FrozenTrial]) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def compute_report(space: SearchSpace, study: optuna.Study) -> ReportData:
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    rows = tuple(_trial_row(t) for t in trials)
    objectives = tuple(Objective(o.key, o.direction) for o in space.objectives)
    params = tuple(p.flag for p in space.params)
    front = best_trials(study)
    recommended: FrozenTrial | None = None
    if len(objectives) == 1:
        picks = pick(study, space.confirm)
        recommended = picks[0] if picks else None
    elif front:
        recommended = pick_by_weights(front, [(o.key, o.direction) for o in objectives],
                                      {o.key: 1.0 for o in objectives})
    base = next((r for r in rows if r.baseline and r.status in (FEASIBLE, VIOLATES)), None)
    best_row = next((r for r in rows if recommended is not None and r.number == recommended.number), None)
    notes = []
    if not front:
        notes.append(no_feasible_message(study))
    elif len(objectives) > 1 and len(front) > 1 and recommended is not None:
        notes.append(f"{len(front)} trials are Pareto-optimal; trial {recommended.number} is the equal-weights pick "
                     "(kttune export --weights KEY=W,... picks another)")
    if base is not None and recommended is not None and base.number == recommended.number:
        notes.append(f"the baseline (trial {base.number}) is still the best trial: no tried configuration beat it, "
                     "so there is no comparison to show")
    if base is not None and base.violated:
        missed = ", ".join(f"{k} by {v:.3g}" for k, v in sorted(base.violated.items()))
        notes.append(f"the baseline (trial {base.number}) itself misses {missed}: the best trial is the best that meets "
                     "every constraint, so it can measure lower than the baseline")
    if base is None:
        notes.append("no measured baseline trial (the space has no baseline, or it did not run)")
    comparison = (compare(space, study, by_number[base.number], by_number[best_row.number])
                  if base is not None and best_row is not None and base is not best_row else ())
    recommend, verdict = gain_verdict(comparison) if len(objectives) == 1 else (True, "")
    if verdict:
        notes.insert(0, verdict)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return ReportData(
        study_name=study.study_name, space_name=space.name, objectives=objectives, params=params,
        choices={p.flag: tuple(p.choices) for p in space.params if p.choices is not None},
        slos=tuple(s.describe() for s in space.slos), trials=rows, front=tuple(t.number for t in front),
        recommended=recommended.number if recommended else None, baseline=base.number if base else None,
        comparison=comparison, keep_baseline="" if recommend else verdict,
        importances=tuple(_importance(trials, o.key, o.direction, params) for o in objectives),
        status_counts=statuses, failure_counts=failure_counts(study), violation_counts=violation_counts(trials),
        elapsed_s=_elapsed(trials), notes=tuple(notes))
