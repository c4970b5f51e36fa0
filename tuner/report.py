"""Read a finished (or running) study back: best-trial tables, picking one trial off a
Pareto front, profile export, and the data behind `kttune report` (computed here, rendered
by :mod:`tuner.report_html`, so tests check numbers rather than pixels)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError, KttuneError
from tuner.profile import render_profile, write_atomic
from tuner.space import SearchSpace, is_finite
from tuner.study import confirmed_or_best  # noqa: F401  (re-exported: the pick rule lives in study)
from tuner.study import (ATTR_BASELINE, ATTR_DUPLICATE_OF, ATTR_LAUNCHED, ATTR_MARGINAL, ATTR_REASON, STUDY_ATTR_SPACE, best_trials,
                         make_storage, metrics_of)

SHOWN_METRICS = ("output_throughput", "input_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")
# Trial statuses as the report sees them.
FEASIBLE = "feasible"  # measured, every constraint (SLOs included) met
VIOLATES = "violates"  # measured, but a constraint (an SLO, a predicted limit) is > 0
INFEASIBLE = "infeasible"  # the configuration did not run: predicted not to fit, OOM, crash
FAILED = "failed"  # infrastructure fault or interrupted (Optuna FAIL)
DUPLICATE = "duplicate"  # same params as a measured trial; no measurement of its own
RUNNING = "running"
PRUNED = "pruned"


def load_study(study_name: str, storage: str) -> optuna.Study:
    store = make_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        hint = f" (it has: {', '.join(names)})" if names else ""
        raise ConfigError(f"--study: no study {study_name!r} in {storage}{hint}; run `kttune run` first or pass --study") from None


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- trial status


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


# --------------------------------------------------------------------------- best / pick


def _repeats_note(study: optuna.Study, t: FrozenTrial) -> str:
    from tuner.strategy import repeat_groups

    g = next((g for g in repeat_groups(study) if g.first.number == t.number), None)
    return "" if g is None or len(g.values) < 2 else f" (mean {g.mean:.4g} ± {g.spread:.2g} of {len(g.values)})"


def best_table(space: SearchSpace, study: optuna.Study) -> list[list[str]]:
    """Rows (header first) for the feasible best trial(s), computed, not printed."""
    best = confirmed_or_best(study)
    keys = [o.key for o in space.objectives]
    extra = [k for k in headline_metrics(space) if k not in keys]
    params = [p.flag for p in space.params]
    rows = [["trial", *params, *keys, *extra]]
    for t in best:
        m = metrics_of(t)
        rows.append([str(t.number) + (" (baseline)" if t.user_attrs.get(ATTR_BASELINE) else "") + _repeats_note(study, t),
                     *(_fmt(t.params.get(p, "")) for p in params),
                     *(_fmt(m.get(k, "")) for k in keys), *(_fmt(m.get(k, "")) for k in extra)])
    return rows


def headline_metrics(space: SearchSpace) -> list[str]:
    """Per workload, what an operator reads first: its throughput (input for prefill-only
    workloads), median TTFT and, when it decodes, median ITL; plus every SLO metric."""
    out: list[str] = []
    for w in space.workloads:
        decodes = w.output_len > 1
        out += [f"{w.name}.{'output' if decodes else 'input'}_throughput", f"{w.name}.median_ttft_ms"]
        if decodes:
            out.append(f"{w.name}.median_itl_ms")
    out += [s.key for s in space.slos if s.key not in out]
    return out


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_best(space: SearchSpace, study_name: str, storage: str) -> bool:
    study = load_study(study_name, storage)
    trials = study.get_trials(deepcopy=False)
    launched = sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED))
    rows = best_table(space, study)
    title = "Pareto front" if len(space.objectives) > 1 else "best trial"
    print(f"study {study_name}: {len(trials)} trials, {launched} launched")
    fails = failure_counts(study)
    if fails:
        print("not measured: " + ", ".join(f"{k} ×{v}" for k, v in sorted(fails.items())))
    if space.slos:
        print("SLOs: " + "; ".join(s.describe() for s in space.slos))
    if len(rows) == 1:
        print(no_feasible_message(study))
        return False
    print(f"{title}:")
    print(_render(rows))
    for line in boundary_notes(study):
        print(line)
    return True


def boundary_notes(study: optuna.Study) -> list[str]:
    """A line per picked configuration that was launched inside the safety margin (to find the
    memory boundary): how close to the limit it runs and how often it started."""
    from tuner.strategy import repeat_groups

    out = []
    groups = {g.first.number: g for g in repeat_groups(study)}
    for t in confirmed_or_best(study):
        same = [x for x in study.get_trials(deepcopy=False) if x.params == t.params and x.user_attrs.get(ATTR_LAUNCHED)]
        if not any(x.user_attrs.get(ATTR_MARGINAL) for x in same):
            continue
        g = groups.get(t.number)
        spare = g.spare_gb if g is not None else None
        out.append(f"note: trial {t.number} was launched inside the safety margin to find the GPU memory limit"
                   + ("" if spare is None else f" (predicted {spare:.2f} GB to spare)" if spare >= 0
                      else f" (predicted {-spare:.2f} GB short at the activation estimate, which its runs beat)")
                   + f" and started in {len(g.values) if g else 1} of {len(same)} launch(es); re-check it after "
                   "changing the driver, the CUDA/torch versions or what else runs on the GPUs")
    return out


def parse_weights(text: str, objective_keys: Sequence[str]) -> dict[str, float]:
    """`decode.output_throughput=2,prefill=1` → weight per objective key. A key may be the
    full `workload.metric`, or a workload or metric name that names one objective only."""
    out: dict[str, float] = {}
    for item in (s for s in text.split(",") if s.strip()):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"--weights: {item!r} is not key=weight; e.g. --weights decode.output_throughput=2,prefill.input_throughput=1")
        matches = [k for k in objective_keys if name in (k, *k.split(".", 1))]
        if len(matches) != 1:
            what = "matches no objective" if not matches else f"is ambiguous ({', '.join(matches)})"
            raise ConfigError(f"--weights: {name!r} {what}; use one of: {', '.join(objective_keys)}")
        try:
            w = float(raw)
        except ValueError:
            raise ConfigError(f"--weights: weight {raw.strip()!r} for {name} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"--weights: weight for {name} must be a finite number ≥ 0, got {raw.strip()}")
        out[matches[0]] = out.get(matches[0], 0.0) + w
    if not out or sum(out.values()) <= 0:
        raise ConfigError("--weights: give at least one positive weight, e.g. decode.output_throughput=1")
    return out


def weighted_scores(trials: Sequence[FrozenTrial], objectives: Sequence[tuple[str, str]],
                    weights: Mapping[str, float]) -> dict[int, float]:
    """Trial number → Σ wᵢ·normᵢ / Σ wᵢ, where normᵢ ∈ [0, 1] rescales objective i over the
    given trials (1 = the best of them, direction-aware). `objectives` is (key, direction)."""
    total = sum(weights.get(k, 0.0) for k, _ in objectives)
    scores = {t.number: 0.0 for t in trials}
    for i, (key, direction) in enumerate(objectives):
        w = weights.get(key, 0.0)
        if w == 0 or not trials:
            continue
        vals = [t.values[i] for t in trials]
        lo, hi = min(vals), max(vals)
        for t in trials:
            v = t.values[i]
            norm = 1.0 if hi == lo else ((v - lo) if direction == "maximize" else (hi - v)) / (hi - lo)
            scores[t.number] += w * norm / total
    return scores


def pick_by_weights(trials: Sequence[FrozenTrial], objectives: Sequence[tuple[str, str]],
                    weights: Mapping[str, float]) -> FrozenTrial:
    """The trial with the highest weighted score (ties: the lower trial number)."""
    if not trials:
        raise KttuneError("no trial to pick from")
    scores = weighted_scores(trials, objectives, weights)
    return max(trials, key=lambda t: (scores[t.number], -t.number))


def _objectives(study: optuna.Study, space: SearchSpace | None) -> list[tuple[str, str]]:
    if space is not None:
        return [(o.key, o.direction) for o in space.objectives]
    keys = (study.user_attrs.get(STUDY_ATTR_SPACE) or {}).get("objectives") or []
    dirs = ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    return list(zip(keys or [f"objective {i}" for i in range(len(dirs))], dirs))


def pick_trial(study: optuna.Study, trial_number: int | None, *, space: SearchSpace | None = None,
               weights: Mapping[str, float] | None = None) -> FrozenTrial:
    if trial_number is not None and weights:
        raise ConfigError("--trial and --weights exclude each other; pass one")
    if trial_number is not None:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= trial_number < len(trials):
            raise ConfigError(f"--trial: no trial {trial_number}; the study has trials 0..{len(trials) - 1}")
        t = trials[trial_number]
        if t.state != TrialState.COMPLETE:
            raise ConfigError(f"--trial: trial {trial_number} is {t.state.name}; pick a completed one")
        return t
    best = confirmed_or_best(study)
    if not best:
        raise KttuneError(no_feasible_message(study))
    if weights:
        return pick_by_weights(best, _objectives(study, space), weights)
    if len(best) > 1:
        raise ConfigError(f"--trial: the study has {len(best)} Pareto-optimal trials ({', '.join(str(t.number) for t in best)}); "
                          "pick one with --trial N or state a preference with --weights KEY=W,...")
    return best[0]


def export_profile(space: SearchSpace, study_name: str, storage: str, out: Path,
                   trial_number: int | None = None, weights: Mapping[str, float] | None = None) -> Path:
    study = load_study(study_name, storage)
    trial = pick_trial(study, trial_number, space=space, weights=weights)
    text = render_profile(trial, study_name=study_name, objectives=[o.key for o in space.objectives])
    write_atomic(out, text)
    return out


# --------------------------------------------------------------------------- report data


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
class Comparison:
    metric: str
    baseline: float | None
    best: float | None
    higher_is_better: bool | None

    @property
    def change_pct(self) -> float | None:
        if self.baseline is None or self.best is None or self.baseline == 0:
            return None
        return 100.0 * (self.best - self.baseline) / abs(self.baseline)


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


def _higher_is_better(metric: str) -> bool | None:
    name = metric.rsplit(".", 1)[-1]
    if name.endswith(("_throughput", "_per_s")):
        return True
    if name.endswith("_ms"):
        return False
    return None


def _trial_row(t: FrozenTrial) -> TrialRow:
    wall = t.user_attrs.get("wall_s")
    return TrialRow(number=t.number, status=classify_trial(t), reason=t.user_attrs.get(ATTR_REASON),
                    baseline=bool(t.user_attrs.get(ATTR_BASELINE)), params=dict(t.params),
                    metrics=metrics_of(t), violated=violated_constraints(t),
                    wall_s=float(wall) if is_finite(wall) else None)


def choose_evaluator(n_trials: int) -> optuna.importance.BaseImportanceEvaluator:
    """fANOVA (Optuna's default; random forests, needs scikit-learn) when available. Else
    PED-ANOVA with a top quantile that holds ≥ 5 trials: its default 10 % is one or two
    trials in a 20-launch study, too few to tell the knobs apart."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 5 / max(n_trials, 1))))
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def _importance(trials: Sequence[FrozenTrial], key: str, direction: str, params: Sequence[str]) -> Importance:
    """Importances of the tuned knobs for one measured metric, over feasible measured trials
    only: pessimistic placeholder values of configs that never ran would swamp the signal."""
    usable = [t for t in trials if classify_trial(t) == FEASIBLE and is_finite(metrics_of(t).get(key))]
    varying = [p for p in params if len({repr(t.params.get(p)) for t in usable if p in t.params}) > 1]
    if len(usable) < 4 or not varying:
        return Importance(key, None, {}, f"needs ≥ 4 feasible measured trials that vary a knob (has {len(usable)})")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        tmp = optuna.create_study(direction=direction)
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
    return Importance(key, name, ordered, "" if any(ordered.values()) else "no knob explains the spread")


def _comparison(base: TrialRow | None, best: TrialRow | None, keys: Sequence[str]) -> tuple[Comparison, ...]:
    """Objectives and SLO metrics first, then each workload's TTFT/ITL (median, p99) when
    measured and not zero (a 1-token prefill job has no ITL)."""
    if base is None or best is None:
        return ()
    latency = ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")
    shown = sorted(k for k in set(base.metrics) & set(best.metrics)
                   if k.rsplit(".", 1)[-1] in latency and k not in keys and (base.metrics[k] or best.metrics[k]))
    return tuple(Comparison(k, base.metrics.get(k), best.metrics.get(k), _higher_is_better(k)) for k in (*keys, *shown))


def _elapsed(trials: Sequence[FrozenTrial]) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def compute_report(space: SearchSpace, study: optuna.Study) -> ReportData:
    trials = study.get_trials(deepcopy=False)
    rows = tuple(_trial_row(t) for t in trials)
    objectives = tuple(Objective(k, d) for k, d in _objectives(study, space))
    params = tuple(p.flag for p in space.params)
    front = best_trials(study)
    recommended: FrozenTrial | None = None
    if len(objectives) == 1:
        picks = confirmed_or_best(study)  # by confirmed mean, like `best` and `export`
        recommended = picks[0] if picks else None
    elif front:
        recommended = pick_by_weights(front, [(o.key, o.direction) for o in objectives],
                                      {o.key: 1.0 for o in objectives})
    base = next((r for r in rows if r.baseline and r.status in (FEASIBLE, VIOLATES)), None)
    best_row = next((r for r in rows if recommended is not None and r.number == recommended.number), None)
    notes = []
    if not front:
        notes.append(no_feasible_message(study))
    elif len(front) > 1:
        notes.append(f"{len(front)} trials are Pareto-optimal; trial {recommended.number} is the equal-weights pick "  # type: ignore[union-attr]
                     "(kttune export --weights KEY=W,... picks another)")
    if base is not None and recommended is not None and base.number == recommended.number:
        notes.append(f"the baseline (trial {base.number}) is still the best trial")
    if base is not None and base.violated:
        missed = ", ".join(f"{k} by {v:.3g}" for k, v in sorted(base.violated.items()))
        notes.append(f"the baseline (trial {base.number}) itself misses {missed}: the best trial is the best that meets "
                     "every constraint, so it can measure lower than the baseline")
    if base is None:
        notes.append("no measured baseline trial (the space has no baseline, or it did not run)")
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return ReportData(
        study_name=study.study_name, space_name=space.name, objectives=objectives, params=params,
        choices={p.flag: tuple(p.choices) for p in space.params if p.choices is not None},
        slos=tuple(s.describe() for s in space.slos), trials=rows, front=tuple(t.number for t in front),
        recommended=recommended.number if recommended else None, baseline=base.number if base else None,
        comparison=_comparison(base, best_row, list(dict.fromkeys([*(o.key for o in objectives), *(x.key for x in space.slos)]))),
        importances=tuple(_importance(trials, o.key, o.direction, params) for o in objectives),
        status_counts=statuses, failure_counts=failure_counts(study), violation_counts=violation_counts(trials),
        elapsed_s=_elapsed(trials), notes=tuple(notes))
