"""Workload traces: a workload's sequence of forwards recorded once from the scheduler,
then priced for any step-time model, and the bench_serving metrics computed from them.

The scheduler's decisions do not depend on step durations (the engine has no clock), so one
trace serves every configuration that schedules alike. Step times are affine in the context
length at a fixed batch/chunk size, which lets numpy price a whole trace from three model
calls per size (checked at run time, with an exact fallback).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from tuner.sim.engine import Engine
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.perfmodel.startup import StartupResult
from tuner.sim.perfmodel.steptime import StepModel
from tuner.sim.scenario import Scenario

WorkloadShape = tuple[int, int, int]  # (num_prompts, input_len, output_len)
METRICS = ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
           "input_throughput", "output_throughput", "total_throughput", "mean_ttft_ms", "median_ttft_ms",
           "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p95_itl_ms", "p99_itl_ms", "max_itl_ms",
           "mean_tpot_ms", "mean_e2e_latency_ms", "concurrency")


class _Recorder:
    """Stands in for the engine's step model: logs each forward, each lasting 1 s."""

    def __init__(self) -> None:
        self.forwards: list[tuple[int, int, float]] = []

    def decode(self, batch: int, ctx_tokens: float) -> float:
        self.forwards.append((0, batch, ctx_tokens))
        return 1.0

    def prefill(self, q_tokens: int, ctx_tokens: float = 0.0) -> float:
        self.forwards.append((1, q_tokens, ctx_tokens))
        return 1.0


@dataclass(frozen=True)
class Trace:
    """One workload's forwards, independent of how long each takes."""

    shape: WorkloadShape
    groups: tuple[tuple[int, int, np.ndarray, np.ndarray], ...]   # (kind, size, forward idx, ctx)
    n_forwards: int
    tok_idx: np.ndarray            # (done requests, output_len): forward index of each token
    max_prefill: int               # largest prefill forward, warmup included (runtime OOM)
    max_batch: int                 # largest decode batch
    chunk_floor: int               # the trace holds for every chunk >= this (0: only its own)
    chunk: int = 0                 # the chunk it was recorded with
    fatal: str | None = None       # a failure no step time can change (stall, warmup rejected)
    errors: int = 0                # requests the server refused

    @property
    def completed(self) -> int:
        return int(self.tok_idx.shape[0])

    def same(self, other: Trace) -> bool:
        """Identical scheduling (used to share a trace over a KV-size interval)."""
        if (self.n_forwards, self.max_prefill, self.max_batch, self.fatal, self.errors) != \
                (other.n_forwards, other.max_prefill, other.max_batch, other.fatal, other.errors):
            return False
        if len(self.groups) != len(other.groups) or self.tok_idx.shape != other.tok_idx.shape:
            return False
        for (k1, s1, i1, c1), (k2, s2, i2, c2) in zip(self.groups, other.groups):
            if k1 != k2 or s1 != s2 or not np.array_equal(i1, i2) or not np.array_equal(c1, c2):
                return False
        return bool(np.array_equal(self.tok_idx, other.tok_idx))


def record_trace(scn: Scenario, cfg: SimConfig, startup: StartupResult, shape: WorkloadShape,
                 fuzz_seed: int | None = None) -> Trace:
    """Replay `engine.run_workload`'s driving with the step model swapped for a recorder.
    `fuzz_seed`: the OOM-fuzz seed `startup` was checked with (a config that only fits
    thanks to the fuzz must be rebuilt with it)."""
    n, inp, out = shape
    # a vanishing sigma turns the fuzz on; step noise only scales the recorder's dummy times
    engine = Engine(scn, cfg, noise_sigma=0.0 if fuzz_seed is None else 1e-12, seed=fuzz_seed or 0)
    # Follow the given start-up (it may carry the OOM fuzz) and never die of a runtime OOM:
    # that is decided per configuration from max_prefill.
    engine.startup = replace(startup, runtime_free_gb=math.inf)
    engine.kv_tokens, engine.max_running = startup.kv_tokens, startup.max_running_requests
    rec = _Recorder()
    engine._model = rec  # type: ignore[assignment]  # the one private seam, covered by the tests
    warm = 0

    def drive(times: dict[str, list[int]] | None) -> str | None:
        while engine.has_work():
            res = engine.step()
            if res.fatal:
                return res.fatal
            if res.duration_s <= 0 and not res.emitted:
                return "scheduler stalled: queued requests can never be admitted"
            if times is not None:
                k = len(rec.forwards) - 1 - warm
                for rid, _, _ in res.emitted:
                    times.setdefault(rid, []).append(k)
        return None

    empty = np.zeros((0, out), dtype=np.int64)
    err = engine.submit("warmup", inp, min(out, 32))
    fatal = f"Warmup failed: {err}" if err else drive(None)
    warm = len(rec.forwards)
    warm_prefill = max((s for k, s, _ in rec.forwards if k == 1), default=0)
    if fatal:
        return Trace(shape, (), 0, empty, warm_prefill, 0, 0, engine.chunk, fatal)
    errors = sum(1 for i in range(n) if engine.submit(f"req-{i}", inp, out))
    times: dict[str, list[int]] = {}
    fatal = drive(times)
    fw = rec.forwards[warm:]
    done = [ts for ts in times.values() if len(ts) >= out]
    tok_idx = np.asarray(done, dtype=np.int64).reshape(len(done), out) if done else empty
    kinds = np.asarray([k for k, _, _ in fw], dtype=np.int64)
    sizes = np.asarray([s for _, s, _ in fw], dtype=np.int64)
    ctxs = np.asarray([c for _, _, c in fw], dtype=np.float64)
    groups = []
    for kind, size in sorted({(int(k), int(s)) for k, s in zip(kinds, sizes)}):
        idx = np.nonzero((kinds == kind) & (sizes == size))[0]
        groups.append((kind, size, idx, ctxs[idx]))
    max_prefill = max([warm_prefill] + [s for k, s, _ in fw if k == 1])
    max_batch = max((s for k, s, _ in fw if k == 0), default=0)
    # A chunk above every prefill forward and decode batch never bound the planner.
    bound = max(max_prefill, max_batch if engine.rc.mixed_chunk else 0) + 1
    return Trace(shape, tuple(groups), len(fw), tok_idx, max_prefill, max_batch,
                 bound if engine.chunk >= bound else 0, engine.chunk, fatal, errors)


def _affine(f: Callable[[int, float], float], size: int, ctx: np.ndarray) -> tuple[float, float, float]:
    """(c0, f(size, c0), slope): f is affine in the context length (checked at a middle point)."""
    c0, c1 = float(ctx.min()), float(ctx.max())
    y0 = f(size, c0)
    if c1 == c0:
        return c0, y0, 0.0
    slope = (f(size, c1) - y0) / (c1 - c0)
    cm = float(ctx[len(ctx) // 2])
    if not math.isclose(f(size, cm), y0 + slope * (cm - c0), rel_tol=1e-9, abs_tol=1e-15):
        return c0, math.nan, math.nan
    return c0, y0, slope


def step_durations(model: StepModel, trace: Trace) -> np.ndarray:
    d = np.empty(trace.n_forwards)
    for kind, size, idx, ctx in trace.groups:
        f = model.decode if kind == 0 else model.prefill
        c0, y0, slope = _affine(f, size, ctx)
        d[idx] = [f(size, float(c)) for c in ctx] if math.isnan(y0) else y0 + slope * (ctx - c0)
    return d


def total_duration(model: StepModel, trace: Trace) -> float:
    """sum(step_durations) without building the array (throughput metrics need only this)."""
    total = 0.0
    for kind, size, idx, ctx in trace.groups:
        f = model.decode if kind == 0 else model.prefill
        c0, y0, slope = _affine(f, size, ctx)
        if math.isnan(y0):
            total += sum(f(size, float(c)) for c in ctx)
        else:
            total += y0 * len(ctx) + slope * (float(ctx.sum()) - c0 * len(ctx))
    return total


_TOTALS = frozenset({"duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                     "input_throughput", "output_throughput", "total_throughput"})


def trace_metrics(trace: Trace, d: np.ndarray | float, names: Iterable[str] | None = None) -> dict[str, float]:
    """The metrics `engine.run_workload` reports (plus total_throughput), for step times d
    (an array, or only their sum when every name is a total or a throughput)."""
    n, inp, out = trace.shape
    want = set(METRICS if names is None else names)
    if isinstance(d, np.ndarray):
        cum = np.cumsum(d)
        duration = float(cum[-1]) if len(cum) else 0.0
    else:
        cum, duration = None, float(d)
    done = trace.completed
    n_in, n_out = inp * done, out * done
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    res: dict[str, float] = {"duration": duration, "completed": float(done), "total_input_tokens": float(n_in),
                             "total_output_tokens": float(n_out), "request_throughput": rate(done),
                             "input_throughput": rate(n_in), "output_throughput": rate(n_out),
                             "total_throughput": rate(n_in + n_out)}
    if want <= _TOTALS:
        return {k: v for k, v in res.items() if k in want}
    if cum is None:
        raise ValueError(f"{sorted(want - _TOTALS)} need the step times, not only their sum")
    ts = cum[trace.tok_idx] if done else np.zeros((0, out))

    def ms(values: np.ndarray, q: float | None = None) -> float:
        arr = (values if values.size else np.zeros(1)) * 1000
        return float(np.mean(arr) if q is None else np.percentile(arr, q))

    ttft, e2e = ts[:, 0], ts[:, -1]
    itl = np.diff(ts, axis=1).ravel()
    tpot = (ts[:, -1] - ts[:, 0]) / (out - 1) if out > 1 else np.zeros(0)
    res.update(mean_ttft_ms=ms(ttft), median_ttft_ms=ms(ttft, 50), p99_ttft_ms=ms(ttft, 99),
               mean_itl_ms=ms(itl), median_itl_ms=ms(itl, 50), p95_itl_ms=ms(itl, 95),
               p99_itl_ms=ms(itl, 99), max_itl_ms=ms(itl, 100), mean_tpot_ms=ms(tpot),
               mean_e2e_latency_ms=ms(e2e), concurrency=rate(float(e2e.sum())))
    return {k: v for k, v in res.items() if k in want}


def workload_metrics(model: StepModel, trace: Trace, names: Iterable[str] | None = None) -> dict[str, float]:
    want = set(METRICS if names is None else names)
    d = total_duration(model, trace) if want <= _TOTALS else step_durations(model, trace)
    return trace_metrics(trace, d, want)
