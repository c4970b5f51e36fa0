"""A runner wrapper that gives a one-call runner (the in-process simulator) the early-stop
probe hook, for tests and the tuning benchmark."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuner import outcome
from tuner.bench import MetricKind, metric_kind
from tuner.config import SearchSpace
from tuner.trial import PROBE_SUFFIX, PhaseCallback, ProbeHook, TrialRun, probe_workload


class ProbeEmulator:
    """Gives a runner without a probe of its own (the in-process simulator, which measures a
    launch in one call) the early-stop hook: it runs the launch whole, hands the hook the
    objective workload's metrics times an extra LogNormal(0, `sigma`) draw (a probe is a
    shorter, noisier run of the same server), and on a prune keeps only the probe's share of
    the benchmark time. `bench_s` / `saved_s` add up benchmark seconds run and skipped."""

    def __init__(self, inner: Callable[..., TrialRun], *, sigma: float = 0.02, seed: int = 0) -> None:
        import random

        self.inner, self.sigma = inner, sigma
        self._rng = random.Random(f"probe/{seed}")
        self.bench_s = 0.0
        self.saved_s = 0.0
        self.pruned = 0

    def __call__(self, space: SearchSpace, flags: Mapping[str, Any], trial_dir: Path, *,
                 on_phase: PhaseCallback | None = None, on_probe: ProbeHook | None = None,
                 **kwargs: Any) -> TrialRun:
        run = self.inner(space, flags, trial_dir, on_phase=on_phase, **kwargs)
        bench = {k: v for k, v in run.timings.items() if k.startswith("bench_")}
        full_s = sum(bench.values())
        probe = probe_workload(space) if on_probe is not None else None
        if probe is None or on_probe is None or not run.outcome.ok:
            self.bench_s += full_s
            return run
        base = probe.name[:-len(PROBE_SUFFIX)]
        noise = self._rng.lognormvariate(0.0, self.sigma)
        seen = {k: v * noise if metric_kind(k) is MetricKind.RATE else v / noise
                for k, v in run.outcome.metrics.items() if k.startswith(base + ".")}
        probe_s = space.probe.fraction * bench.get(f"bench_{base}_s", 0.0)
        if seen and on_probe(seen):
            self.bench_s += probe_s
            self.saved_s += full_s
            self.pruned += 1
            run.timings = {**{k: v for k, v in run.timings.items() if not k.startswith("bench_")},
                           f"bench_{probe.name}_s": round(probe_s, 3)}
            run.outcome = outcome.pruned({f"{probe.name}.{k[len(base) + 1:]}": v for k, v in seen.items()})
        else:
            self.bench_s += full_s + probe_s
            self.saved_s -= probe_s
        return run
