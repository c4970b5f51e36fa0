"""`SimEvaluator`: exact noise-free outcomes of many configurations of one scenario and
workload set, sharing recorded traces between configurations that schedule alike and
step-time models between configurations that time alike."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.sim.optimum.traces import Trace, WorkloadShape, record_trace, workload_metrics
from tuner.sim.perfmodel.config import ResolvedConfig, SimConfig
from tuner.sim.perfmodel.startup import StartupResult, runtime_extra_gb, startup_check
from tuner.sim.perfmodel.steptime import StepModel
from tuner.sim.scenario import Scenario

#: ResolvedConfig fields the step-time model reads (StepModel, cpu_capability).
PERF_FIELDS = ("tp", "kt_on", "gpu_experts", "cpuinfer", "threadpool", "method", "deferral",
               "layerwise_threshold", "routing", "updated_routing", "cpu_backend")


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
        trace = self.trace
        return (trace.chunk == chunk or 0 < trace.chunk_floor <= chunk) and self.kv_lo <= kv <= self.kv_hi


class SimEvaluator:
    """Exact noise-free predictions for many configurations of one scenario and workload set."""

    def __init__(self, scn: Scenario, workloads: Mapping[str, WorkloadShape]) -> None:
        self.scn, self.workloads = scn, dict(workloads)
        self._traces: dict[tuple[Any, ...], list[_TraceEntry]] = {}
        self._models: dict[tuple[Any, ...], StepModel] = {}
        self.recorded = 0

    def _key(self, startup: StartupResult, name: str) -> tuple[tuple[Any, ...], int]:
        """(scheduling key without KV size, effective KV size); values that cannot bind are
        collapsed: at most num_prompts requests ever run, and they never hold more than
        num_prompts * (input_len + output_len) tokens."""
        num_prompts, input_len, output_len = shape = self.workloads[name]
        rc = startup.config
        assert rc is not None
        return ((name, shape, min(startup.max_running_requests, num_prompts), rc.mixed_chunk, rc.context_len),
                min(startup.kv_tokens, num_prompts * (input_len + output_len)))

    def find(self, startup: StartupResult, name: str) -> Trace | None:
        key, kv = self._key(startup, name)
        chunk = startup.config.chunk if startup.config else 0
        for entry in self._traces.get(key, ()):
            if entry.covers(chunk, kv):
                return entry.trace
        return None

    def trace(self, cfg: SimConfig, startup: StartupResult, name: str, fuzz_seed: int | None = None) -> Trace:
        found = self.find(startup, name)
        if found is not None:
            return found
        key, kv = self._key(startup, name)
        recorded_trace = record_trace(self.scn, cfg, startup, self.workloads[name], fuzz_seed)
        self.recorded += 1
        self._traces.setdefault(key, []).append(_TraceEntry(recorded_trace, kv, kv))
        return recorded_trace

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

            def get(index: int) -> Trace:
                cfg, st = per_kv[kvs[index]]
                return self.trace(cfg, st, name)

            def bisect(lo: int, hi: int, trace_lo: Trace, trace_hi: Trace) -> None:
                if hi - lo <= 1:
                    return
                if trace_lo is trace_hi or trace_lo.same(trace_hi):
                    self._traces[key[:-1]].append(_TraceEntry(trace_lo, kvs[lo], kvs[hi]))
                    return
                mid = (lo + hi) // 2
                trace_mid = get(mid)
                bisect(lo, mid, trace_lo, trace_mid)
                bisect(mid, hi, trace_mid, trace_hi)

            bisect(0, len(kvs) - 1, get(0), get(len(kvs) - 1))

    def model(self, rc: ResolvedConfig, startup: StartupResult, trace: Trace) -> StepModel:
        captured = min(rc.graph_max_bs, startup.max_running_requests, max(trace.max_batch, 1))
        # Dynamic expert update re-picks the GPU experts at the first layerwise prefill; a
        # benchmark prefills its prompts first, so the whole trace is timed as updated.
        updated = rc.updated_routing is not None and trace.max_prefill >= rc.layerwise_threshold
        key = tuple(getattr(rc, f) for f in PERF_FIELDS) + (captured, updated)
        step_model = self._models.get(key)
        if step_model is None:
            step_model = self._models[key] = StepModel.build(self.scn, rc, captured_bs=captured, updated=updated)
        return step_model

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
        num_prompts, input_len, output_len = self.workloads[name]
        rc = startup.config
        assert rc is not None
        limit = min(startup.kv_tokens, rc.context_len)
        if input_len + min(output_len, 32) > limit or input_len + output_len > limit:
            return self.runtime_failure(rc, startup, self.trace(cfg, startup, name, fuzz_seed))
        max_forward = min(rc.chunk, num_prompts * (input_len + output_len + 1))
        if runtime_extra_gb(self.scn, rc, max_forward) <= startup.runtime_free_gb:
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
