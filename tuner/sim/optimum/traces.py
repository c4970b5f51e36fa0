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
DECODE, PREFILL = 0, 1  # kinds of forward in a trace


class _Recorder:
    """Stands in for the engine's step model: logs each forward, each lasting 1 s."""

    def __init__(self) -> None:
        self.forwards: list[tuple[int, int, float]] = []

    def decode(self, batch: int, ctx_tokens: float) -> float:
        self.forwards.append((DECODE, batch, ctx_tokens))
        return 1.0

    def prefill(self, q_tokens: int, ctx_tokens: float = 0.0) -> float:
        self.forwards.append((PREFILL, q_tokens, ctx_tokens))
        return 1.0


@dataclass(frozen=True)
class Trace:
    """One workload's forwards, independent of how long each takes."""

    shape: WorkloadShape
    groups: tuple[tuple[int, int, np.ndarray, np.ndarray], ...]   # (kind, size, forward indices, context lengths)
    n_forwards: int
    token_forward: np.ndarray      # (done requests, output_len): forward index of each token
    max_prefill: int               # largest prefill forward, warmup included (runtime OOM)
    max_batch: int                 # largest decode batch
    chunk_floor: int               # the trace holds for every chunk >= this (0: only its own)
    chunk: int = 0                 # the chunk it was recorded with
    fatal: str | None = None       # a failure no step time can change (stall, warmup rejected)
    errors: int = 0                # requests the server refused

    @property
    def completed(self) -> int:
        return int(self.token_forward.shape[0])

    def same(self, other: Trace) -> bool:
        """Identical scheduling (used to share a trace over a KV-size interval)."""
        if (self.n_forwards, self.max_prefill, self.max_batch, self.fatal, self.errors) != \
                (other.n_forwards, other.max_prefill, other.max_batch, other.fatal, other.errors):
            return False
        if len(self.groups) != len(other.groups) or self.token_forward.shape != other.token_forward.shape:
            return False
        for (kind, size, idx, ctx), (kind2, size2, idx2, ctx2) in zip(self.groups, other.groups):
            if kind != kind2 or size != size2 or not np.array_equal(idx, idx2) or not np.array_equal(ctx, ctx2):
                return False
        return bool(np.array_equal(self.token_forward, other.token_forward))


def record_trace(scn: Scenario, cfg: SimConfig, startup: StartupResult, shape: WorkloadShape,
                 fuzz_seed: int | None = None) -> Trace:
    """Replay `engine.run_workload`'s driving with the step model swapped for a recorder.
    `fuzz_seed`: the OOM-fuzz seed `startup` was checked with (a config that only fits
    thanks to the fuzz must be rebuilt with it)."""
    num_prompts, input_len, output_len = shape
    # a vanishing sigma turns the fuzz on; step noise only scales the recorder's dummy times
    engine = Engine(scn, cfg, noise_sigma=0.0 if fuzz_seed is None else 1e-12, seed=fuzz_seed or 0)
    # Follow the given start-up (it may carry the OOM fuzz) and never die of a runtime OOM:
    # that is decided per configuration from max_prefill.
    engine.startup = replace(startup, runtime_free_gb=math.inf)
    engine.kv_tokens, engine.max_running = startup.kv_tokens, startup.max_running_requests
    recorder = _Recorder()
    engine._model = recorder  # the one private seam, covered by the tests
    warmup_forwards = 0

    def drive(times: dict[str, list[int]] | None) -> str | None:
        while engine.has_work():
            res = engine.step()
            if res.fatal:
                return res.fatal
            if res.duration_s <= 0 and not res.emitted:
                return "scheduler stalled: queued requests can never be admitted"
            if times is not None:
                forward_idx = len(recorder.forwards) - 1 - warmup_forwards
                for rid, _, _ in res.emitted:
                    times.setdefault(rid, []).append(forward_idx)
        return None

    empty = np.zeros((0, output_len), dtype=np.int64)
    err = engine.submit("warmup", input_len, min(output_len, 32))
    fatal = f"Warmup failed: {err}" if err else drive(None)
    warmup_forwards = len(recorder.forwards)
    warm_prefill = max((size for kind, size, _ in recorder.forwards if kind == PREFILL), default=0)
    if fatal:
        return Trace(shape, (), 0, empty, warm_prefill, 0, 0, engine.chunk, fatal)
    errors = sum(1 for i in range(num_prompts) if engine.submit(f"req-{i}", input_len, output_len))
    times: dict[str, list[int]] = {}
    fatal = drive(times)
    forwards = recorder.forwards[warmup_forwards:]
    done = [ts for ts in times.values() if len(ts) >= output_len]
    token_forward = np.asarray(done, dtype=np.int64).reshape(len(done), output_len) if done else empty
    kinds = np.asarray([kind for kind, _, _ in forwards], dtype=np.int64)
    sizes = np.asarray([size for _, size, _ in forwards], dtype=np.int64)
    ctxs = np.asarray([ctx for _, _, ctx in forwards], dtype=np.float64)
    groups = []
    for kind, size in sorted({(int(k), int(s)) for k, s in zip(kinds, sizes)}):
        idx = np.nonzero((kinds == kind) & (sizes == size))[0]
        groups.append((kind, size, idx, ctxs[idx]))
    max_prefill = max([warm_prefill] + [size for kind, size, _ in forwards if kind == PREFILL])
    max_batch = max((size for kind, size, _ in forwards if kind == DECODE), default=0)
    # A chunk above every prefill forward and decode batch never bound the planner.
    bound = max(max_prefill, max_batch if engine.rc.mixed_chunk else 0) + 1
    return Trace(shape, tuple(groups), len(forwards), token_forward, max_prefill, max_batch,
                 bound if engine.chunk >= bound else 0, engine.chunk, fatal, errors)


def _affine(step_time: Callable[[int, float], float], size: int, ctx: np.ndarray) -> tuple[float, float, float]:
    """(ctx_lo, step_time(size, ctx_lo), slope): step_time is affine in the context length
    (checked at a middle point); NaNs when it is not."""
    ctx_lo, ctx_hi = float(ctx.min()), float(ctx.max())
    time_lo = step_time(size, ctx_lo)
    if ctx_hi == ctx_lo:
        return ctx_lo, time_lo, 0.0
    slope = (step_time(size, ctx_hi) - time_lo) / (ctx_hi - ctx_lo)
    ctx_mid = float(ctx[len(ctx) // 2])
    if not math.isclose(step_time(size, ctx_mid), time_lo + slope * (ctx_mid - ctx_lo), rel_tol=1e-9, abs_tol=1e-15):
        return ctx_lo, math.nan, math.nan
    return ctx_lo, time_lo, slope


def step_durations(model: StepModel, trace: Trace) -> np.ndarray:
    durations = np.empty(trace.n_forwards)
    for kind, size, idx, ctx in trace.groups:
        step_time = model.decode if kind == DECODE else model.prefill
        ctx_lo, time_lo, slope = _affine(step_time, size, ctx)
        durations[idx] = ([step_time(size, float(ctx_tokens)) for ctx_tokens in ctx] if math.isnan(time_lo)
                          else time_lo + slope * (ctx - ctx_lo))
    return durations


def total_duration(model: StepModel, trace: Trace) -> float:
    """sum(step_durations) without building the array (throughput metrics need only this)."""
    total = 0.0
    for kind, size, idx, ctx in trace.groups:
        step_time = model.decode if kind == DECODE else model.prefill
        ctx_lo, time_lo, slope = _affine(step_time, size, ctx)
        if math.isnan(time_lo):
            total += sum(step_time(size, float(ctx_tokens)) for ctx_tokens in ctx)
        else:
            total += time_lo * len(ctx) + slope * (float(ctx.sum()) - ctx_lo * len(ctx))
    return total


_TOTALS = frozenset({"duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                     "input_throughput", "output_throughput", "total_throughput"})


def trace_metrics(trace: Trace, durations: np.ndarray | float, names: Iterable[str] | None = None) -> dict[str, float]:
    """The metrics `engine.run_workload` reports (plus total_throughput), for step times `durations`
    (an array, or only their sum when every name is a total or a throughput)."""
    _, input_len, output_len = trace.shape
    want = set(METRICS if names is None else names)
    if isinstance(durations, np.ndarray):
        cumulative = np.cumsum(durations)
        duration = float(cumulative[-1]) if len(cumulative) else 0.0
    else:
        cumulative, duration = None, float(durations)
    done = trace.completed
    n_in, n_out = input_len * done, output_len * done
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    res: dict[str, float] = {"duration": duration, "completed": float(done), "total_input_tokens": float(n_in),
                             "total_output_tokens": float(n_out), "request_throughput": rate(done),
                             "input_throughput": rate(n_in), "output_throughput": rate(n_out),
                             "total_throughput": rate(n_in + n_out)}
    if want <= _TOTALS:
        return {k: v for k, v in res.items() if k in want}
    if cumulative is None:
        raise ValueError(f"{sorted(want - _TOTALS)} need the step times, not only their sum")
    token_times = cumulative[trace.token_forward] if done else np.zeros((0, output_len))

    def ms(values: np.ndarray, q: float | None = None) -> float:
        arr = (values if values.size else np.zeros(1)) * 1000
        return float(np.mean(arr) if q is None else np.percentile(arr, q))

    ttft, e2e = token_times[:, 0], token_times[:, -1]
    itl = np.diff(token_times, axis=1).ravel()
    tpot = (token_times[:, -1] - token_times[:, 0]) / (output_len - 1) if output_len > 1 else np.zeros(0)
    res.update(mean_ttft_ms=ms(ttft), median_ttft_ms=ms(ttft, 50), p99_ttft_ms=ms(ttft, 99),
               mean_itl_ms=ms(itl), median_itl_ms=ms(itl, 50), p95_itl_ms=ms(itl, 95),
               p99_itl_ms=ms(itl, 99), max_itl_ms=ms(itl, 100), mean_tpot_ms=ms(tpot),
               mean_e2e_latency_ms=ms(e2e), concurrency=rate(float(e2e.sum())))
    return {k: v for k, v in res.items() if k in want}


def workload_metrics(model: StepModel, trace: Trace, names: Iterable[str] | None = None) -> dict[str, float]:
    want = set(METRICS if names is None else names)
    durations = total_duration(model, trace) if want <= _TOTALS else step_durations(model, trace)
    return trace_metrics(trace, durations, want)
