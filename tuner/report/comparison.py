"""Baseline vs pick, every workload's throughput and latency, with a noise verdict: the one
comparison `kttune best` and `kttune report` show.

Each side is the mean over its configuration's measured launches. A change is called a gain or
a loss only beyond the run-to-run noise measured for that metric (the spread of repeats of the
same configuration, pooled by `tuner.selection.pooled_noise`, prior the space's `confirm.noise`):
beyond NOISE_Z standard errors of the difference of the two means. A loss on a metric that is
not an objective is shown, and flagged where no SLO bounds it (nothing guarded it in the study).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from tuner.bench import higher_is_better
from tuner.config import SearchSpace
from tuner.selection import Repeats, config_key, measured, pooled_noise
from tuner.storage import metrics_of

# A difference of two means counts as real beyond this many standard errors (about 95 %).
NOISE_Z = 2.0
GAIN, LOSS, NOISE, UNKNOWN = "gain", "loss", "within noise", "-"


@dataclass(frozen=True)
class Comparison:
    metric: str  # workload.metric
    baseline: float | None
    best: float | None
    higher_is_better: bool | None
    runs_baseline: int = 1
    runs_best: int = 1
    noise_pct: float | None = None  # NOISE_Z standard errors of the difference, in % of the baseline
    objective: bool = False
    slo: str | None = None  # the SLO that bounds the metric, if any

    @property
    def change_pct(self) -> float | None:
        if self.baseline is None or self.best is None or self.baseline == 0:
            return None
        return 100.0 * (self.best - self.baseline) / abs(self.baseline)

    @property
    def verdict(self) -> str:
        """gain / loss beyond the noise, within noise, or - when either side is missing."""
        pct = self.change_pct
        if pct is None or self.higher_is_better is None:
            return UNKNOWN
        if self.noise_pct is not None and abs(pct) <= self.noise_pct:
            return NOISE
        return GAIN if (pct > 0) == self.higher_is_better else LOSS

    @property
    def flagged(self) -> bool:
        """A loss beyond the noise on a metric no objective or SLO watched."""
        return self.verdict == LOSS and not self.objective and self.slo is None

    def describe(self) -> str:
        """One cell of text: '+6.7 % (within noise ±8.1 %)'."""
        pct = self.change_pct
        if pct is None:
            return "-"
        noise = "" if self.noise_pct is None else f" ±{self.noise_pct:.1f} %"
        flag = "; no SLO guards it" if self.flagged else ""
        return f"{pct:+.1f} % ({self.verdict}{noise}{flag})"


def shown_metrics(space: SearchSpace) -> list[str]:
    """Objectives, SLO metrics, then every workload's throughput (output where it decodes, else
    input) and latency (ITL only where it decodes)."""
    out = [o.key for o in space.objectives] + [s.key for s in space.slos]
    for w in space.workloads:
        decodes = w.output_len > 1
        names = ["output_throughput" if decodes else "input_throughput", "median_ttft_ms", "p99_ttft_ms"]
        names += ["median_itl_ms", "p99_itl_ms"] if decodes else []
        out += [f"{w.name}.{m}" for m in names]
    return list(dict.fromkeys(out))


def _runs(trials: Sequence[FrozenTrial], of: FrozenTrial) -> list[FrozenTrial]:
    key = config_key(of.params)
    same = [t for t in trials if config_key(t.params) == key]
    return same or [of]


def compare(space: SearchSpace, study: optuna.Study, baseline: FrozenTrial, best: FrozenTrial) -> tuple[Comparison, ...]:
    """Rows for every metric of :func:`shown_metrics` measured on both sides (a metric zero on
    both, e.g. the ITL of a 1-token job, is left out)."""
    trials = measured(study.get_trials(deepcopy=False))
    base_runs, best_runs = _runs(trials, baseline), _runs(trials, best)
    by_config: dict[tuple[object, ...], list[FrozenTrial]] = {}
    for t in trials:
        by_config.setdefault(config_key(t.params), []).append(t)
    objectives = {o.key for o in space.objectives}
    slos = {s.key: s.describe() for s in space.slos}
    out = []
    for key in shown_metrics(space):
        b = [metrics_of(t)[key] for t in base_runs if key in metrics_of(t)]
        p = [metrics_of(t)[key] for t in best_runs if key in metrics_of(t)]
        if not b or not p or not (any(b) or any(p)):
            continue
        mb, mp = sum(b) / len(b), sum(p) / len(p)
        groups = [Repeats(ts[0], tuple(v for v in (metrics_of(t).get(key) for t in ts) if v is not None and v > 0))
                  for ts in by_config.values()]
        sigma = pooled_noise([g for g in groups if g.values], space.confirm.noise)
        noise = 100.0 * NOISE_Z * sigma * math.sqrt(1.0 / len(b) + 1.0 / len(p))
        out.append(Comparison(key, mb, mp, higher_is_better(key), len(b), len(p), noise, key in objectives, slos.get(key)))
    return tuple(out)


KEEP_BASELINE = "no significant gain over the baseline: keep it"


def gain_verdict(rows: Sequence[Comparison]) -> tuple[bool, str]:
    """Whether the pick is worth recommending over the baseline, and the line that says so: every
    objective a gain beyond the noise, and no metric worse beyond the noise that no objective or
    SLO watched (a latency the study never bounded). Otherwise the baseline stays, and the line
    names what fell short. No comparison (no baseline measured): recommended, no line."""
    objectives = [c for c in rows if c.objective]
    if not objectives:
        return True, ""
    short = [f"{c.metric} {c.describe()}" for c in objectives if c.verdict != GAIN]
    worse = [f"{c.metric} {c.describe()}" for c in rows if c.flagged]
    if short or worse:
        return False, f"{KEEP_BASELINE} ({'; '.join(short + worse)})"
    gains = ", ".join(f"{c.metric} {c.change_pct:+.1f} %" for c in objectives if c.change_pct is not None)
    return True, f"the pick beats the baseline beyond the run-to-run noise ({gains})"
