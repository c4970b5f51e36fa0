"""Ground truth for tuning quality: enumerate a search space's grid on the simulator's model
(noise off) and report the true optimum per objective.

`python -m tuner.sim optimum --scenario NAME --space FILE` prints it (see `main`).

A full grid is 10^5-10^6 configurations and one `api.predict` replays hundreds of scheduler
steps, so the enumeration is exact but shares work (`SimEvaluator` holds the caches):

* start-up memory is checked once per combination of the memory knobs; kt-cpuinfer,
  kt-threadpool-count and deferral never change the footprint, so their CPU check is
  memoised separately;
* the scheduler's decisions do not depend on step durations (the engine has no clock), so
  each workload's sequence of forwards is recorded once per scheduling key (max running,
  KV tokens, chunk, ...; values that cannot bind are collapsed) and only the step times are
  recomputed per configuration. Step times are linear in the context length at a fixed
  batch/chunk size, which lets numpy price a whole trace from three model calls per size
  (checked at run time, with an exact fallback);
* a runtime OOM is monotone in the forward size, so it is decided from the largest forward.

`tests/test_sim_optimum.py` checks all of this against `tuner.sim.api.predict`.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from tuner.config.space import AUTO, ParamSpec, SearchSpace, load_space
from tuner.errors import ConfigError, KttuneError
from tuner.server.argv import flag_args
from tuner.sim.args import UsageError, parse_args, to_sim_config
from tuner.sim.engine import Engine
from tuner.sim.perfmodel.config import ResolvedConfig, SimConfig, resolve
from tuner.sim.perfmodel.startup import StartupResult, runtime_extra_gb, startup_check
from tuner.sim.perfmodel.steptime import StepModel
from tuner.sim.scenario import Scenario, load_scenario

WorkloadShape = tuple[int, int, int]  # (num_prompts, input_len, output_len)
#: SimConfig fields that never change the start-up footprint (perfmodel.startup._footprint).
CPU_FIELDS = ("kt_cpuinfer", "kt_threadpool_count", "kt_max_deferred_experts_per_token")
#: ResolvedConfig fields the step-time model reads (StepModel, cpu_capability).
_PERF_FIELDS = ("tp", "kt_on", "gpu_experts", "cpuinfer", "threadpool", "method", "deferral",
                "layerwise_threshold")
FLOAT_GRID_POINTS = 33
METRICS = ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
           "input_throughput", "output_throughput", "total_throughput", "mean_ttft_ms", "median_ttft_ms",
           "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p95_itl_ms", "p99_itl_ms", "max_itl_ms",
           "mean_tpot_ms", "mean_e2e_latency_ms", "concurrency")


# ----------------------------------------------------------------------------- traces


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


# ----------------------------------------------------------------------------- evaluator


@dataclass(frozen=True)
class Evaluation:
    """Noise-free outcome of one configuration (metrics keyed `workload.metric`)."""

    feasible: bool
    reason: str | None
    stage: str | None                       # start-up stage that failed, "runtime", or None
    metrics: dict[str, float] = field(default_factory=dict)
    startup: StartupResult | None = None


@dataclass
class _TraceEntry:
    trace: Trace
    kv_lo: int
    kv_hi: int

    def covers(self, chunk: int, kv: int) -> bool:
        t = self.trace
        return (t.chunk == chunk or 0 < t.chunk_floor <= chunk) and self.kv_lo <= kv <= self.kv_hi


class SimEvaluator:
    """Exact noise-free predictions for many configurations of one scenario and workload set."""

    def __init__(self, scn: Scenario, workloads: Mapping[str, WorkloadShape]) -> None:
        self.scn, self.workloads = scn, dict(workloads)
        self._traces: dict[tuple[Any, ...], list[_TraceEntry]] = {}
        self._models: dict[tuple[Any, ...], StepModel] = {}
        self.recorded = 0

    def _key(self, startup: StartupResult, name: str) -> tuple[tuple[Any, ...], int]:
        """(scheduling key without KV size, effective KV size); values that cannot bind are
        collapsed: at most n requests ever run, and they never hold more than n*(in+out)."""
        n, inp, out = shape = self.workloads[name]
        rc = startup.config
        assert rc is not None
        return ((name, shape, min(startup.max_running_requests, n), rc.mixed_chunk, rc.context_len),
                min(startup.kv_tokens, n * (inp + out)))

    def find(self, startup: StartupResult, name: str) -> Trace | None:
        key, kv = self._key(startup, name)
        chunk = startup.config.chunk if startup.config else 0
        for e in self._traces.get(key, ()):
            if e.covers(chunk, kv):
                return e.trace
        return None

    def trace(self, cfg: SimConfig, startup: StartupResult, name: str, fuzz_seed: int | None = None) -> Trace:
        found = self.find(startup, name)
        if found is not None:
            return found
        key, kv = self._key(startup, name)
        t = record_trace(self.scn, cfg, startup, self.workloads[name], fuzz_seed)
        self.recorded += 1
        self._traces.setdefault(key, []).append(_TraceEntry(t, kv, kv))
        return t

    def prepare(self, items: Sequence[tuple[SimConfig, StartupResult]], name: str) -> None:
        """Record the traces `items` need with few engine runs: the scheduling is the same
        for every KV size between two sizes whose traces are identical, so bisect on it."""
        by_key: dict[tuple[Any, ...], dict[int, tuple[SimConfig, StartupResult]]] = {}
        for cfg, st in items:
            key, kv = self._key(st, name)
            by_key.setdefault(key + (st.config.chunk if st.config else 0,), {}).setdefault(kv, (cfg, st))
        for key in sorted(by_key, key=lambda k: -k[-1]):   # big chunks first: they may cover the rest
            per_kv = by_key[key]
            kvs = sorted(per_kv)

            def get(i: int) -> Trace:
                cfg, st = per_kv[kvs[i]]
                return self.trace(cfg, st, name)

            def bisect(i: int, j: int, ti: Trace, tj: Trace) -> None:
                if j - i <= 1:
                    return
                if ti is tj or ti.same(tj):
                    self._traces[key[:-1]].append(_TraceEntry(ti, kvs[i], kvs[j]))
                    return
                m = (i + j) // 2
                tm = get(m)
                bisect(i, m, ti, tm)
                bisect(m, j, tm, tj)

            bisect(0, len(kvs) - 1, get(0), get(len(kvs) - 1))

    def model(self, rc: ResolvedConfig, startup: StartupResult, trace: Trace) -> StepModel:
        captured = min(rc.graph_max_bs, startup.max_running_requests, max(trace.max_batch, 1))
        key = tuple(getattr(rc, f) for f in _PERF_FIELDS) + (captured,)
        sm = self._models.get(key)
        if sm is None:
            sm = self._models[key] = StepModel.build(self.scn, rc, captured_bs=captured)
        return sm

    def runtime_failure(self, rc: ResolvedConfig, startup: StartupResult, trace: Trace) -> str | None:
        if trace.fatal:
            return trace.fatal
        if runtime_extra_gb(self.scn, rc, trace.max_prefill) > startup.runtime_free_gb:
            return f"CUDA out of memory at a {trace.max_prefill}-token forward"
        if trace.completed < trace.shape[0]:
            return f"completed {trace.completed} of {trace.shape[0]} requests"
        return None

    def quick_failure(self, cfg: SimConfig, startup: StartupResult, name: str,
                      fuzz_seed: int | None = None) -> str | None:
        """A workload's failure without its trace where bounds decide it: a request longer
        than the KV pool or the context is refused; a runtime OOM needs a forward above the
        free memory, and no forward exceeds min(chunk, all tokens + one rider per request)."""
        n, inp, out = self.workloads[name]
        rc = startup.config
        assert rc is not None
        limit = min(startup.kv_tokens, rc.context_len)
        if inp + min(out, 32) > limit or inp + out > limit:
            return self.runtime_failure(rc, startup, self.trace(cfg, startup, name, fuzz_seed))
        q_hi = min(rc.chunk, n * (inp + out + 1))
        if runtime_extra_gb(self.scn, rc, q_hi) <= startup.runtime_free_gb:
            return None
        return self.runtime_failure(rc, startup, self.trace(cfg, startup, name, fuzz_seed))

    def evaluate(self, cfg: SimConfig, startup: StartupResult | None = None,
                 metrics: Mapping[str, Iterable[str] | None] | None = None,
                 fuzz_seed: int | None = None) -> Evaluation:
        """Start-up, then each workload. `metrics` maps workload → metric names (None: all);
        by default every workload with every metric. Workloads not in `metrics` are only
        checked for failures. `fuzz_seed`: the OOM-fuzz seed a given `startup` used."""
        st = startup if startup is not None else startup_check(self.scn, cfg)
        if not st.ok or st.config is None:
            first = st.error_lines[0] if st.error_lines else "startup failed"
            return Evaluation(False, f"{st.stage}: {first}", st.stage, {}, st)
        rc = st.config
        out: dict[str, float] = {}
        wanted = metrics if metrics is not None else dict.fromkeys(self.workloads)
        for name in self.workloads:
            if name not in wanted:
                bad = self.quick_failure(cfg, st, name, fuzz_seed)
            else:
                trace = self.trace(cfg, st, name, fuzz_seed)
                bad = self.runtime_failure(rc, st, trace)
            if bad:
                return Evaluation(False, f"runtime ({name}): {bad}", "runtime", out, st)
            if name in wanted:
                out.update({f"{name}.{k}": v for k, v in
                            workload_metrics(self.model(rc, st, trace), trace, wanted[name]).items()})
        return Evaluation(True, None, None, out, st)


# ----------------------------------------------------------------------------- space grid


def param_values(p: ParamSpec) -> list[Any]:
    """Every value of a param's grid (floats without a step: FLOAT_GRID_POINTS points)."""
    if p.choices is not None:
        return list(p.choices)
    assert p.low is not None and p.high is not None
    if not p.is_float:
        step = int(p.step or 1)
        return list(range(int(p.low), int(p.high) + 1, step))
    if p.step:
        k = int(math.floor((p.high - p.low) / p.step + 1e-9))
        return [round(p.low + i * p.step, 12) for i in range(k + 1)]
    if p.log:
        return [float(v) for v in np.geomspace(p.low, p.high, FLOAT_GRID_POINTS)]
    return [float(v) for v in np.linspace(p.low, p.high, FLOAT_GRID_POINTS)]


@dataclass(frozen=True)
class OptimumEntry:
    objective: str            # workload.metric
    direction: str
    value: float
    params: dict[str, Any]
    ties: int                 # grid configurations with the same value (rel 1e-9)
    near: dict[str, float]    # share of feasible configurations within 2 % / 5 % of it


@dataclass(frozen=True)
class OptimumResult:
    space: str
    scenario: str
    grid_size: int
    feasible: int
    entries: tuple[OptimumEntry, ...]
    seconds: float
    inert: tuple[str, ...] = ()     # tuned flags the simulator ignores


class SpaceGrid:
    """A search space on one simulator scenario: tuned params → SimConfig, single-config
    evaluation (memoised) and the exhaustive optimum."""

    def __init__(self, space: SearchSpace, scenario: str | Scenario | None = None) -> None:
        self.space = space
        self.values = {p.flag: param_values(p) for p in space.params}
        first = {p.flag: vals[0] for p, vals in zip(space.params, self.values.values())}
        base_flags = space.launch_flags(first)
        # `max-total-tokens: auto` is sized per configuration, as kttune does before a launch
        self._auto = None
        if any(v == AUTO for v in base_flags.values()) or any(AUTO in v for v in self.values.values()):
            from tuner.feasibility.gate import FeasibilityGate
            self._auto = FeasibilityGate.for_space(space)
        args = _parse(self._resolved(base_flags))
        name = scenario if scenario is not None else args.sim.scenario
        self.scn = name if isinstance(name, Scenario) else load_scenario(str(name))
        self.base = to_sim_config(args)
        self.deltas: dict[str, list[dict[str, Any]]] = {}
        for p in space.params:
            self.deltas[p.flag] = [_delta(self.base, to_sim_config(_parse(self._resolved({**base_flags, p.flag: v}))))
                                   for v in self.values[p.flag]]
        if self._auto is not None:   # max-total-tokens follows other knobs: not a delta of one param
            for ds in self.deltas.values():
                for d in ds:
                    d.pop("max_total_tokens", None)
        self._check_disjoint()
        shapes = {w.name: (w.num_prompts, w.input_len, w.output_len) for w in space.workloads}
        self.evaluator = SimEvaluator(self.scn, shapes)
        self._memo: dict[SimConfig, Evaluation] = {}
        self._scores: tuple[list[str], list[str], list[Any]] | None = None

    def _resolved(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        return self._auto.resolve_auto(flags) if self._auto is not None else dict(flags)

    def _finish(self, cfg: SimConfig, params: Mapping[str, Any]) -> SimConfig:
        """Fill `max-total-tokens: auto` for these params (a no-op without auto)."""
        if self._auto is None:
            return cfg
        flags = self._resolved(self.space.launch_flags(params))
        return replace(cfg, max_total_tokens=to_sim_config(_parse(flags)).max_total_tokens)

    def _check_disjoint(self) -> None:
        owner: dict[str, str] = {}
        for flag, ds in self.deltas.items():
            for f in {k for d in ds for k in d}:
                if f in owner and owner[f] != flag:
                    raise ConfigError(f"params {owner[f]} and {flag} both set the simulator's {f}; "
                                      "tune only one of them")
                owner[f] = flag

    @property
    def inert(self) -> tuple[str, ...]:
        return tuple(f for f, ds in self.deltas.items() if len(ds) > 1 and not any(ds))

    def sim_config(self, params: Mapping[str, Any]) -> SimConfig:
        merged: dict[str, Any] = {}
        for p in self.space.params:
            v = params[p.flag]
            vals = self.values[p.flag]
            if v in vals:
                merged.update(self.deltas[p.flag][vals.index(v)])
            else:  # off-grid value (e.g. an unstepped float): parse the whole configuration
                return to_sim_config(_parse(self._resolved(self.space.launch_flags(params))))
        return self._finish(replace(self.base, **merged), params)

    def evaluate(self, params: Mapping[str, Any]) -> Evaluation:
        cfg = self.sim_config(params)
        ev = self._memo.get(cfg)
        if ev is None:
            ev = self._memo[cfg] = self.evaluator.evaluate(cfg)
        return ev

    def values_of(self, params: Mapping[str, Any]) -> list[float] | None:
        """The objective vector without noise, or None if the configuration fails or misses
        an SLO."""
        ev = self.evaluate(params)
        if not ev.feasible or any(s.violation(ev.metrics[s.key]) > 0 for s in self.space.slos):
            return None
        return [ev.metrics[o.key] for o in self.space.objectives]

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def optimum(self) -> OptimumResult:
        started = time.monotonic()
        ev = self.evaluator
        inert = set(self.inert)
        live = [p.flag for p in self.space.params if p.flag not in inert]
        cpu = [f for f in live if all(set(d) <= set(CPU_FIELDS) for d in self.deltas[f])]
        mem = [f for f in live if f not in cpu]
        scored = sorted({o.workload for o in self.space.objectives} | {s.workload for s in self.space.slos})
        # 1. start-up per combination of the memory knobs (CPU knobs at a neutral 1 thread, 1 pool)
        probe_cpu = {"kt_cpuinfer": 1, "kt_threadpool_count": 1, "kt_max_deferred_experts_per_token": 0}
        items: list[tuple[tuple[int, ...], SimConfig, SimConfig, StartupResult]] = []
        for combo in itertools.product(*(range(len(self.values[f])) for f in mem)):
            cfg_mem = replace(self.base, **self._merge(mem, combo))
            if self._auto is not None:
                cfg_mem = self._finish(cfg_mem, self._params(mem, combo, [], []))
            probe = replace(cfg_mem, **probe_cpu)
            st = startup_check(self.scn, probe)
            if st.ok and st.config is not None:
                items.append((combo, cfg_mem, probe, st))
        # 2. traces of the scored workloads (recorded on the probe: scheduling ignores the CPU
        # knobs); the other workloads only need to not fail
        for name in scored:
            ev.prepare([(p, s) for _, _, p, s in items], name)
        groups: dict[tuple[Any, ...], list[tuple[int, ...]]] = {}
        reps: dict[tuple[Any, ...], tuple[SimConfig, StartupResult, dict[str, Trace]]] = {}
        for combo, cfg_mem, probe, st in items:
            rc = st.config
            assert rc is not None
            traces = {name: ev.trace(probe, st, name) for name in scored}
            if any(ev.runtime_failure(rc, st, t) for t in traces.values()):
                continue
            if any(ev.quick_failure(probe, st, w) for w in ev.workloads if w not in traces):
                continue
            top = max((t.max_batch for t in traces.values()), default=1)
            key = (tuple(getattr(rc, f) for f in _PERF_FIELDS if f not in ("cpuinfer", "threadpool", "deferral")),
                   tuple(id(traces[w]) for w in scored), min(rc.graph_max_bs, st.max_running_requests, max(top, 1)))
            groups.setdefault(key, []).append(combo)
            reps.setdefault(key, (cfg_mem, st, traces))
        # 3. every CPU-knob combination on each group's representative
        want: dict[str, set[str]] = {}
        for item in (*self.space.objectives, *self.space.slos):
            want.setdefault(item.workload, set()).add(item.metric)
        cpu_combos = list(itertools.product(*(range(len(self.values[f])) for f in cpu)))
        cpu_verdict: dict[tuple[Any, ...], bool] = {}
        scores: list[tuple[list[float], tuple[int, ...], tuple[int, ...], int]] = []
        for key, combos in groups.items():
            cfg_mem, st, traces = reps[key]
            for cc in cpu_combos:
                cfg = replace(cfg_mem, **self._merge(cpu, cc))
                ck = (cfg.kt_cpuinfer, cfg.kt_threadpool_count, cfg.kt_method, cfg.kt_weight_path is not None,
                      cfg.kt_num_gpu_experts is None, cfg.kt_gpu_experts_ratio is None)
                ok = cpu_verdict.get(ck)
                if ok is None:
                    full = startup_check(self.scn, cfg)
                    ok = full.ok
                    if full.ok or full.stage == "cpu":   # the CPU check alone decided it
                        cpu_verdict[ck] = ok
                if not ok:
                    continue
                rc = resolve(self.scn, cfg)
                got: dict[str, float] = {}
                for w, names in want.items():
                    got.update({f"{w}.{k}": v for k, v in
                                workload_metrics(ev.model(rc, st, traces[w]), traces[w], names).items()})
                if any(slo.violation(got[slo.key]) > 0 for slo in self.space.slos):
                    continue
                scores.append(([got[o.key] for o in self.space.objectives], combos, cc, len(combos)))
        self._scores = (mem, cpu, scores)
        entries = []
        feasible = sum(s[3] for s in scores)
        for j, o in enumerate(self.space.objectives):
            if not scores:
                break
            sign = 1.0 if o.direction == "maximize" else -1.0
            best = max(scores, key=lambda s: sign * s[0][j])
            v = best[0][j]
            ties = sum(s[3] for s in scores if math.isclose(s[0][j], v, rel_tol=1e-9))
            near = {f"{int(r * 100)}%": sum(s[3] for s in scores if _within(s[0][j], v, r, sign)) / feasible
                    for r in (0.02, 0.05)}
            entries.append(OptimumEntry(o.key, o.direction, v, self._params(mem, best[1][0], cpu, best[2]), ties, near))
        n_inert = math.prod(len(self.values[f]) for f in inert) if inert else 1
        return OptimumResult(self.space.name, self.scn.name, self.grid_size(), feasible * n_inert,
                             tuple(entries), time.monotonic() - started, tuple(sorted(inert)))

    def ranked(self, within: float = 0.05, objective: int = 0) -> list[tuple[float, dict[str, Any]]]:
        """Every feasible grid configuration within `within` (relative) of the optimum of one
        objective, best first (runs `optimum()` first if needed)."""
        if self._scores is None:
            self.optimum()
        assert self._scores is not None
        mem, cpu, scores = self._scores
        if not scores:
            return []
        sign = 1.0 if self.space.objectives[objective].direction == "maximize" else -1.0
        best = max(sign * s[0][objective] for s in scores)
        out = []
        for vals, combos, cc, _ in scores:
            v = vals[objective]
            if _within(v, sign * best, within, sign):
                out.extend((v, self._params(mem, mc, cpu, cc)) for mc in combos)
        out.sort(key=lambda item: -sign * item[0])
        return out

    def _merge(self, flags: Sequence[str], combo: Sequence[int]) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for f, i in zip(flags, combo):
            merged.update(self.deltas[f][i])
        return merged

    def _params(self, mem: Sequence[str], mc: Sequence[int], cpu: Sequence[str], cc: Sequence[int]
                ) -> dict[str, Any]:
        idx = dict(zip(mem, mc)) | dict(zip(cpu, cc))
        return {p.flag: self.values[p.flag][idx.get(p.flag, 0)] for p in self.space.params}


def _within(x: float, best: float, r: float, sign: float) -> bool:
    return sign * (best - x) <= r * abs(best)


def _parse(flags: Mapping[str, Any]) -> Any:
    try:
        return parse_args(flag_args(flags) + ["--host", "127.0.0.1", "--port", "30000"])
    except UsageError as exc:
        raise ConfigError(f"the simulator rejects these launch flags: {exc}") from None


def _delta(base: SimConfig, cfg: SimConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(SimConfig) if getattr(cfg, f.name) != getattr(base, f.name)}


# ----------------------------------------------------------------------------- CLI


def format_result(res: OptimumResult) -> str:
    lines = [f"space {res.space} on scenario {res.scenario}: {res.grid_size} configurations, "
             f"{res.feasible} feasible ({res.seconds:.1f} s)"]
    if res.inert:
        lines.append(f"ignored by the simulator (any value): {', '.join(res.inert)}")
    if not res.entries:
        lines.append("no configuration of the grid starts and completes every workload")
    for e in res.entries:
        near = ", ".join(f"{share:.1%} within {k}" for k, share in e.near.items())
        lines.append(f"{e.objective} ({e.direction}): {e.value:.6g}  [{e.ties} tied; {near}]")
        lines.append("  " + " ".join(f"{k}={v}" for k, v in e.params.items()))
    return "\n".join(lines)


def optimum(space: SearchSpace | str, scenario: str | None = None) -> OptimumResult:
    sp = load_space(space, check_paths=False) if isinstance(space, str) else space
    return SpaceGrid(sp, scenario).optimum()


def main(argv: Sequence[str] | None = None) -> int:
    """`optimum --space FILE [--scenario NAME]`: print the true optimum per objective."""
    parser = argparse.ArgumentParser(prog="python -m tuner.sim optimum",
                                     description="Enumerate a search space's grid on the simulator's model "
                                                 "(noise off) and print the true optimum per objective.")
    parser.add_argument("--space", required=True, help="search-space YAML")
    parser.add_argument("--scenario", help="simulator scenario (default: the space's sim-scenario)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        print(format_result(optimum(args.space, args.scenario)))
    except KttuneError as exc:
        print(f"optimum: error: {exc}", file=sys.stderr)
        return 2
    return 0
