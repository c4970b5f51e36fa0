"""Which trial: the one place every command and the tuning loop ask it.

`pick(study, confirm)` is the selection rule: with one objective, the launched configuration
with the best mean over its measurements (a lucky single run does not win; a configuration
that failed any of its launches is out), except that among configurations statistically tied
with it the one with the most GPU memory to spare wins; with several objectives, the feasible
Pareto front, from which `pick_by_weights` takes one. `kttune best`, `export`, `report`, the
dashboard note and the loop's final pick all call `pick` with the space's `ConfirmSpec`, whose
`noise` is the prior run-to-run spread that decides what counts as a tie.

The helpers here (grouping repeats, pooled noise, feasibility of a measurement, the Pareto
front) are also what the search uses to find its incumbent, so "best" means one thing.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner.bench import higher_is_better
from tuner.capacity import (
    THIN_Z,
    Capacity,
    StartDraws,
    available_after_start_gb,
    capacities,
    launched_flags,
    left_at_draw_gb,
    memory_failed_below,
    needs_at_least,
    runs_at_least,
    start_draws,
)
from tuner.config import CAPACITY_FLAGS, ConfirmSpec
from tuner.errors import KttuneError
from tuner.storage import ATTR_LAUNCHED, ATTR_REASON, ATTR_RUNTIME_NEED_GB, ATTR_SPARE_GB, objective_keys

# A configuration tied with the best mean (within this many standard errors of the
# difference) may win on memory to spare.
TIE_Z = 0.5
# Degrees of freedom the prior noise is worth against measured repeats.
PRIOR_WEIGHT = 4.0
# Fewer GPU experts, all else equal, beat more only by this many standard errors (a one-sided
# test at about 2 %): throughput rises with GPU experts while the KV pool holds the need.
MONOTONE_Z = 2.0


def config_key(params: Mapping[str, Any]) -> tuple[Any, ...]:
    """A hashable identity of a configuration (its params, order-free)."""
    return tuple(sorted(params.items()))


def is_feasible_measurement(t: FrozenTrial) -> bool:
    """Every constraint met (≤ 0) and no failure reason."""
    return all(v <= 0 for v in t.constraints.values()) and not t.user_attrs.get(ATTR_REASON)


def measured(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Launched, completed trials with values that meet every constraint."""
    return [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_LAUNCHED)
            and t.values is not None and is_feasible_measurement(t)]


def direction_sign(direction: StudyDirection) -> float:
    """+1 when larger is better, -1 when smaller is."""
    return 1.0 if direction == StudyDirection.MAXIMIZE else -1.0


@dataclass(frozen=True)
class Repeats:
    """All launched measurements of one configuration: the first trial and its repeats."""

    first: FrozenTrial
    values: tuple[float, ...]
    spare_gb: float | None = None  # least GPU memory to spare predicted for its launches
    capacity: Capacity | None = None  # its KV pool against the objective workload's need
    judged: float | None = None  # its value at the worst pool its memory flags were seen with
    free_sd: float | None = None  # launch-to-launch sd of free memory before the weights (GB, the start-up draw)
    start_spare: float | None = None  # GB to spare at run time on an average start (:func:`_start_spares`)
    low_start_spare: float | None = None  # the same on a start THIN_Z sds short of the mean draw

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def score(self) -> float:
        """What the configuration is ranked by: the mean, judged at the worst observed KV pool
        where the pool varied below the need (`tuner.capacity`)."""
        return self.mean if self.judged is None else self.judged

    @property
    def spread(self) -> float:
        """Half the range of the repeats (0 for a single run)."""
        return (max(self.values) - min(self.values)) / 2 if len(self.values) > 1 else 0.0

    @property
    def thin_start(self) -> bool:
        """A start THIN_Z spreads short of the mean draw would leave its forwards too little
        memory: some fresh starts would run out, however often it started here."""
        return self.low_start_spare is not None and self.low_start_spare < 0

    @property
    def eligible(self) -> bool:
        """May be the pick: a result that may depend on the start-up draw of the KV pool needs a
        second launch first (one launch says nothing of the draw)."""
        return self.capacity is None or not self.capacity.sensitive or len(self.values) > 1


def repeat_groups(study: optuna.Study) -> list[Repeats]:
    """Feasible launched measurements grouped by configuration, best score first (single
    objective; the empty list for several). A configuration that failed any of its launches
    (an OOM on a re-launch, a crash) is left out: a profile must start every time; so is one
    that needs at least the GPU memory of a launch that failed for memory (the same memory
    flags, or larger ones of `tuner.capacity.MEMORY_MONOTONE_FLAGS`)."""
    if len(study.directions) != 1:
        return []
    groups: dict[tuple[Any, ...], list[FrozenTrial]] = {}
    failed: set[tuple[Any, ...]] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE or not t.user_attrs.get(ATTR_LAUNCHED):
            continue
        if t.user_attrs.get(ATTR_REASON):
            failed.add(config_key(t.params))
        elif t.values is not None and is_feasible_measurement(t):
            groups.setdefault(config_key(t.params), []).append(t)
    for key in failed:
        groups.pop(key, None)
    oom = memory_failed_below(study)
    for key in [k for k, ts in groups.items()
                if any(needs_at_least(launched_flags(ts[0]), f) for f in oom)]:
        groups.pop(key)
    sign = direction_sign(study.direction)
    objective = objective_keys(study)[0]
    workload, _, metric = objective.rpartition(".")
    caps = capacities(study, workload or None, groups)
    draws, survived = start_draws(study), _survived(study)
    bound = sign > 0 and higher_is_better(metric) is True  # the λ bound holds for rates
    out = []
    for key, ts in groups.items():
        ts = sorted(ts, key=lambda t: t.number)
        values = tuple(t.values[0] for t in ts)
        cap = caps[key]
        judged = None
        if bound and cap.sensitive:
            judged = float(np.mean([v * cap.factor(i) for i, v in enumerate(values)]))
        out.append(Repeats(ts[0], values, _least_spare(ts), cap, judged, draws.sd, *_start_spares(ts, survived, draws)))
    return sorted(out, key=lambda r: (-sign * r.score, r.first.number))


def best_by_mean(trials: Sequence[FrozenTrial], sign: float) -> FrozenTrial:
    """The first trial of the configuration with the best mean over its repeats (single
    objective; `sign` +1 to maximise). Every trial given counts; nothing is filtered."""
    groups: dict[tuple[Any, ...], list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(config_key(t.params), []).append(t)
    best = max(groups.values(), key=lambda ts: sign * float(np.mean([t.values[0] for t in ts])))
    return best[0]


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
    """The trials no other trial given dominates."""
    return [t for t in trials if not any(_dominates(o, t, directions) for o in trials)]


def _dominates(a: FrozenTrial, b: FrozenTrial, dirs: Sequence[StudyDirection]) -> bool:
    better = False
    for x, y, d in zip(a.values, b.values, dirs):
        sx, sy = (x, y) if d == StudyDirection.MAXIMIZE else (-x, -y)
        if sx < sy:
            return False
        better = better or sx > sy
    return better


def _least_spare(trials: Sequence[FrozenTrial]) -> float | None:
    spares = [float(t.user_attrs[ATTR_SPARE_GB]) for t in trials if t.user_attrs.get(ATTR_SPARE_GB) is not None]
    return min(spares) if spares else None


def _start_spares(own: Sequence[FrozenTrial], survived: Sequence[tuple[Mapping[str, Any], float]],
                  draws: StartDraws) -> tuple[float | None, float | None]:
    """GB a configuration has to spare at run time on an average start and on one THIN_Z
    spreads short of the study's mean draw: what its own launches leave free after such a
    start-up (:func:`tuner.capacity.left_at_draw_gb`, on average) less what its forwards take.
    That is the memory model's figure (`ATTR_RUNTIME_NEED_GB`), or less where launches show
    it: no more than the least that any launch had left which ran forwards at least as large and
    finished its benchmarks (`survived`: flags and GB left). Without those figures: the model's
    predicted spare, or more where launches show that much, and a short start losing all of its
    shortfall."""
    flags = launched_flags(own[0])
    mean, sd = draws.mean(flags), draws.sd
    shown = [a for f, a in survived if runs_at_least(f, flags)]
    needs = [float(t.user_attrs[ATTR_RUNTIME_NEED_GB]) for t in own if t.user_attrs.get(ATTR_RUNTIME_NEED_GB) is not None]
    if needs and shown and mean is not None and (average := _mean_left(own, mean)) is not None:
        need = min(max(needs), min(shown))
        low = None if sd is None else _mean_left(own, mean - THIN_Z * sd)
        return average - need, None if low is None else low - need
    spare = _least_spare(own)
    left = [a for a in map(available_after_start_gb, own) if a is not None]
    if left and shown:  # its own launches are among `survived`, unless they reported nothing
        shown_spare = sum(left) / len(left) - min(shown)
        spare = shown_spare if spare is None else max(spare, shown_spare)
    return spare, None if spare is None or sd is None else spare - THIN_Z * sd


def _mean_left(own: Sequence[FrozenTrial], draw_gb: float) -> float | None:
    left = [a for a in (left_at_draw_gb(t, draw_gb) for t in own) if a is not None]
    return sum(left) / len(left) if left else None


def _survived(study: optuna.Study) -> list[tuple[dict[str, Any], float]]:
    """Flags and GB left after start-up of every launch that finished its benchmarks (whatever
    became of other launches of its configuration)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_LAUNCHED) and not t.user_attrs.get(ATTR_REASON):
            left = available_after_start_gb(t)
            if left is not None:
                out.append((launched_flags(t), left))
    return out


def _less_capacity(params: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Fewer GPU experts (a capacity flag) than `than`: not a tie however close the runs, since
    throughput rises with them; what trades at equal capacity is memory (R, chunk, ...)."""
    return any(isinstance(params.get(f), (int, float)) and isinstance(than.get(f), (int, float))
               and params[f] < than[f] for f in CAPACITY_FLAGS)


def pooled_noise(groups: Sequence[Repeats], prior: float, prior_weight: float = PRIOR_WEIGHT) -> float:
    """Run-to-run spread (sd of log values) pooled over configurations measured more than
    once, shrunk toward `prior` (worth `prior_weight` degrees of freedom) while repeats are few.
    Configurations whose KV pool varied across the need are left out: their spread is the
    start-up draw's, not the benchmark's."""
    ss, df = prior_weight * prior * prior, prior_weight
    for g in groups:
        if g.capacity is not None and g.capacity.sensitive:
            continue
        logs = [math.log(v) for v in g.values if v > 0]
        if len(logs) > 1:
            mean = sum(logs) / len(logs)
            ss += sum((x - mean) ** 2 for x in logs)
            df += len(logs) - 1
    return math.sqrt(ss / df)


def _only_capacity_differs(params: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    return any(params.get(f) != than.get(f) for f in CAPACITY_FLAGS) and \
        all(params.get(k) == than.get(k) for k in set(params) | set(than) if k not in CAPACITY_FLAGS)


def starting_reliably(groups: Sequence[Repeats]) -> list[Repeats]:
    """`groups` without those that would not start reliably (`Repeats.thin_start`), unless
    that leaves none: what the pick and its confirmations choose among."""
    return [g for g in groups if not g.thin_start] or list(groups)


def pick_group(groups: Sequence[Repeats], prior_noise: float, z: float = TIE_Z) -> Repeats | None:
    """The configuration to deploy (`groups` as from :func:`repeat_groups`, best score first):
    the best eligible score (one that starts reliably, where any does: not `thin_start`), then
    two corrections, both within the noise (:func:`pooled_noise`):

    - a configuration that differs from it only by more GPU experts, whose KV pool holds the
      need, replaces it unless it trails by MONOTONE_Z standard errors: throughput rises with
      GPU experts while the pool holds, so a smaller lead of fewer experts is read as noise;
    - among those tied with it (within `z` standard errors; both measured at least twice; no
      fewer GPU experts; a pool that holds) the one with the most GPU memory to spare wins: the
      same throughput as far as the runs can tell, and the likeliest to start every time."""
    if not groups:
        return None
    eligible = [g for g in groups if g.eligible]
    if not eligible:
        return groups[0]
    eligible = starting_reliably(eligible)
    top = eligible[0]
    if top.score <= 0:
        return top
    sigma = pooled_noise(groups, prior_noise)

    def trails_by(g: Repeats) -> float:
        """How many standard errors of the difference `g` trails `top` by."""
        se = sigma * math.sqrt(1.0 / len(top.values) + 1.0 / len(g.values))
        return (math.log(top.score) - math.log(g.score)) / se if se > 0 else math.inf

    def holds(g: Repeats) -> bool:
        return g.capacity is None or g.capacity.holds

    more = [g for g in eligible if len(g.values) > 1 and g.score > 0 and holds(g)
            and _only_capacity_differs(g.first.params, top.first.params)
            and not _less_capacity(g.first.params, top.first.params) and trails_by(g) < MONOTONE_Z]
    if more:
        top = max(more, key=lambda g: tuple(float(g.first.params.get(f) or 0) for f in CAPACITY_FLAGS))
    if top.spare_gb is None or len(top.values) < 2:
        return top
    tied = [g for g in eligible if g.spare_gb is not None and g.score > 0 and len(g.values) > 1 and holds(g)
            and abs(trails_by(g)) < z and not _less_capacity(g.first.params, top.first.params)]
    if not tied:
        return top
    return max(tied, key=lambda g: g.spare_gb if g.spare_gb is not None else -math.inf)


def pick(study: optuna.Study, confirm: ConfirmSpec) -> list[FrozenTrial]:
    """The selection rule (module doc): one objective → [the configuration to deploy, as its
    first trial]; several → the feasible Pareto front; [] before anything feasible."""
    chosen = pick_group(repeat_groups(study), confirm.noise)
    return [chosen.first] if chosen is not None else best_trials(study)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible best trial(s) as Optuna sees them: the Pareto front for several objectives."""
    try:
        return list(study.best_trials)
    except ValueError:
        return []


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
