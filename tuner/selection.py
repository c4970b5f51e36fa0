"""Which trial to deploy: repeats of one configuration grouped and averaged, statistical
ties broken towards fewer GPU experts, the Pareto front, and picks by objective weights."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.config import CAPACITY_FLAGS, ConfirmSpec
from tuner.errors import KttuneError
from tuner.search.grid import _key
from tuner.storage.attrs import ATTR_LAUNCHED, ATTR_REASON, ATTR_SPARE_GB


def _feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values()) and not t.user_attrs.get(ATTR_REASON)


@dataclass(frozen=True)
class Repeats:
    """All launched measurements of one configuration: the first trial and its repeats."""

    first: FrozenTrial
    values: tuple[float, ...]
    spare_gb: float | None = None  # least GPU memory to spare predicted for its launches

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def spread(self) -> float:
        """Half the range of the repeats (0 for a single run)."""
        return (max(self.values) - min(self.values)) / 2 if len(self.values) > 1 else 0.0


def repeat_groups(study: optuna.Study) -> list[Repeats]:
    """Feasible launched measurements grouped by configuration, best mean first (single
    objective; the empty list for several). A configuration that failed any of its launches
    (an OOM on a re-launch, a crash) is left out: a profile must start every time."""
    if len(study.directions) != 1:
        return []
    groups: dict[tuple[Any, ...], list[FrozenTrial]] = {}
    failed: set[tuple[Any, ...]] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE or not t.user_attrs.get(ATTR_LAUNCHED):
            continue
        if t.user_attrs.get(ATTR_REASON):
            failed.add(_key(t.params))
        elif t.values is not None and _feasible(t):
            groups.setdefault(_key(t.params), []).append(t)
    for key in failed:
        groups.pop(key, None)
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    out = [Repeats(min(ts, key=lambda t: t.number), tuple(t.values[0] for t in ts), _least_spare(ts))
           for ts in groups.values()]
    return sorted(out, key=lambda r: (-sign * r.mean, r.first.number))


def _least_spare(trials: Sequence[FrozenTrial]) -> float | None:
    spares = [float(t.user_attrs[ATTR_SPARE_GB]) for t in trials if t.user_attrs.get(ATTR_SPARE_GB) is not None]
    return min(spares) if spares else None


def _less_capacity(params: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Fewer GPU experts (a capacity flag) than `than`: not a tie however close the runs, since
    throughput rises with them; what trades at equal capacity is memory (R, chunk, ...)."""
    return any(isinstance(params.get(f), (int, float)) and isinstance(than.get(f), (int, float))
               and params[f] < than[f] for f in CAPACITY_FLAGS)


def pick_group(groups: Sequence[Repeats], prior_noise: float, z: float = 0.5) -> Repeats | None:
    """The configuration to deploy: the best mean, except that among those statistically tied
    with it (within `z` standard errors of the difference, noise from :func:`pooled_noise`;
    both measured at least twice; no fewer GPU experts) the one with the most GPU memory to
    spare wins: the same throughput as far as the runs can tell, and the likeliest to start
    every time. `groups` as from :func:`repeat_groups`."""
    if not groups:
        return None
    top = groups[0]
    if top.spare_gb is None or top.mean <= 0 or len(top.values) < 2:
        return top
    sigma = pooled_noise(groups, prior_noise)
    tied = [g for g in groups if g.spare_gb is not None and g.mean > 0 and len(g.values) > 1 and
            abs(math.log(top.mean) - math.log(g.mean)) < z * sigma * math.sqrt(1.0 / len(top.values) + 1.0 / len(g.values))
            and not _less_capacity(g.first.params, top.first.params)]
    return max(tied, key=lambda g: g.spare_gb) if tied else top  # type: ignore[arg-type,return-value]


def pooled_noise(groups: Sequence[Repeats], prior: float, prior_weight: float = 4.0) -> float:
    """Run-to-run spread (sd of log values) pooled over configurations measured more than
    once, shrunk toward `prior` (worth `prior_weight` degrees of freedom) while repeats are few."""
    ss, df = prior_weight * prior * prior, prior_weight
    for g in groups:
        logs = [math.log(v) for v in g.values if v > 0]
        if len(logs) > 1:
            mean = sum(logs) / len(logs)
            ss += sum((x - mean) ** 2 for x in logs)
            df += len(logs) - 1
    return math.sqrt(ss / df)


def confirmed_or_best(study: optuna.Study, prior_noise: float = ConfirmSpec.noise) -> list[FrozenTrial]:
    """best_trials; with one objective, the launched configuration with the best mean over its
    measurements (confirmation runs re-measure finalists), as its first trial — so a lucky
    single run does not win, and a duplicate answered from a measurement does not tie; among
    configurations tied with it, the one with the most GPU memory to spare (strategy.pick_group)."""
    from tuner.selection import pick_group, repeat_groups

    groups = repeat_groups(study)
    pick = pick_group(groups, prior_noise)
    return [pick.first] if pick is not None else best_trials(study)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible best trial(s): the Pareto front for several objectives."""
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
