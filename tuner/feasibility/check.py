"""The verdict on one flag set: constraints, binding constraint, fix hints, warnings, and the
largest number of GPU experts that fits."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tuner.feasibility.calibration import MemoryCalibration, anchor_margin, band_calibration, boundary_calibration
from tuner.feasibility.memory import GPU_MEMORY_CONSTRAINTS, GpuMemory, gpu_constraints, gpu_memory
from tuner.feasibility.plan import GB, LaunchPlan, Workload, flag_number, flag_on, resolve_launch
from tuner.machine.hardware import Hardware
from tuner.machine.model import ModelSizes


@dataclass(frozen=True)
class FeasibilityReport:
    """The verdict for one flag set. ``constraints`` decide ``feasible`` (all ≤ 0);
    ``breakdown_gb`` is per GPU (TP0, which also holds the KT staging buffer)."""

    constraints: dict[str, float]
    soft_constraints: dict[str, float]
    feasible: bool
    binding: str | None
    breakdown_gb: dict[str, float]
    kv_capacity_tokens: int
    kv_capacity_requests: int
    warnings: list[str]
    hints: dict[str, str] = field(default_factory=dict)
    plan: LaunchPlan | None = None
    title: str = ""
    # Not feasible only because of the anchored safety margin: the expected footprint fits.
    marginal: bool = False
    # Not feasible, nor marginal, but fits inside the margin if activations are below their estimate.
    activation_test: bool = False
    bare_slack_gb: float | None = None  # predicted GPU-memory slack without that margin (anchored only)
    band_slack_gb: float | None = None  # the same with activations as low as a marginal launch tests

    def fix_hint(self) -> str:
        """The smallest change that makes room, binding constraint first; "" when feasible."""
        order = [self.binding] + [k for k in self.hints if k != self.binding]
        return "; ".join(self.hints[k] for k in order if k in self.hints)

    def explain(self) -> str:
        b = self.breakdown_gb
        lines = [f"{self.title}: {'fits' if self.feasible else 'DOES NOT FIT'}"
                 + ("" if self.binding is None else f" (binding: {self.binding} = {self.constraints[self.binding]:+.3g})")]
        lines.append("GPU memory per GPU (TP0, GB):")
        for key in ("weights_nonexpert", "gpu_experts", "staging", "kv", "req_pool", "cuda_graphs",
                    "activations", "layerwise_slot", "margin"):
            lines.append(f"  {key:<18} {b[key]:8.2f}")
        lines.append(f"  {'total':<18} {b['total']:8.2f}   (startup terms + max(margin, activations + slot))")
        lines.append(f"  {'available':<18} {b['available']:8.2f}   (free {b['free']:.2f} - CUDA context {b['cuda_context']:.2f})")
        lines.append(f"KV pool: {self.kv_capacity_tokens} tokens, {self.kv_capacity_requests} of the largest request at once")
        lines.append("Constraints (<= 0 holds):")
        for k, v in {**self.constraints, **self.soft_constraints}.items():
            tag = "" if v <= 0 else ("  VIOLATED" if k in self.constraints else "  (soft: slower, still runs)")
            lines.append(f"  {k:<34} {v:+10.3f}{tag}")
        lines += [f"warning: {w}" for w in self.warnings]
        if not self.feasible:
            lines.append(f"fix: {self.fix_hint()}")
        return "\n".join(lines)


# Failures a launch meets before memory matters, in the order it meets them.
_STRUCTURAL = ("tp_over_gpus", "tp_divides_heads", "kt_cpuinfer_missing", "cpu_isa_missing", "chunked_prefill_below_1",
               "threadpool_over_numa", "cpuinfer_below_threadpools", "threadpool_divides_intermediate", "cpu_ram_gb")


def _binding(cons: Mapping[str, float], scales: Mapping[str, float]) -> str | None:
    """The first violated structural constraint, else the one with the largest excess relative
    to its scale. A KV shortfall caused by weights leaving no room counts as the memory one."""
    for key in _STRUCTURAL:
        if cons.get(key, 0) > 0:
            return key
    bad = {k: v / max(scales.get(k, 1.0), 1e-9) for k, v in cons.items() if v > 0}
    if "kv_tokens_short" in bad and any(k in bad for k in GPU_MEMORY_CONSTRAINTS):
        del bad["kv_tokens_short"]
    return max(bad, key=lambda k: bad[k]) if bad else None


def check(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload], *,
          margin_gb: float = 2.0, calibration: MemoryCalibration | None = None) -> FeasibilityReport:
    """Predict whether ``flags`` (dashed CLI names, no leading dashes) fit; see module doc."""
    cal = calibration or MemoryCalibration()
    plan = resolve_launch(model, hw, flags, workloads)
    max_req = max((i + o for _, i, o in workloads), default=0)
    max_in = max((i for _, i, _ in workloads), default=0)
    mem = gpu_memory(model, hw, plan, cal, max_in)
    cpu = hw.cpu
    cons: dict[str, float] = {"tp_over_gpus": float(plan.tp - len(hw.gpus[plan.base_gpu:]))}
    heads_rem = model.num_attention_heads % plan.tp
    if model.attention == "gqa" and model.num_kv_heads % plan.tp and plan.tp % model.num_kv_heads:
        heads_rem = max(heads_rem, model.num_kv_heads % plan.tp)
    cons["tp_divides_heads"] = float(heads_rem)
    cons.update(gpu_constraints(mem, plan, margin_gb, max_req, cal))
    if max_req:
        cons["context_len_short"] = float(max_req - plan.context_len)
    soft: dict[str, float] = {}
    warns: list[str] = []
    if plan.kt_enabled:
        threads = plan.cpuinfer or 0
        cons["kt_cpuinfer_missing"] = 0.0 if plan.cpuinfer else 1.0
        cons["chunked_prefill_below_1"] = float(1 - plan.chunk)
        cons["cpuinfer_over_cores"] = float(threads - cpu.physical_cores)
        cons["cpuinfer_below_threadpools"] = float(plan.threadpools - threads)
        cons["threadpool_over_numa"] = float(plan.threadpools - cpu.numa_nodes)
        cons["threadpool_divides_intermediate"] = float(model.moe_intermediate_size % max(plan.threadpools, 1))
        if plan.kt_method.startswith("AMX"):
            cons["cpu_isa_missing"] = 0.0 if cpu.avx512 else 1.0
        host = model.cpu_expert_bytes_total(plan.kt_method) + (cal.host_base_gb + cal.host_gb_per_gpu * plan.tp) * GB
        cons["cpu_ram_gb"] = (host - (hw.ram_available_bytes or hw.ram_bytes)) / GB
        soft["cpuinfer_over_free_cores"] = float(threads - (cpu.physical_cores - plan.tp))
        soft["threads_per_pool_over_node"] = threads / max(plan.threadpools, 1) - cpu.min_cores_per_node
    if workloads and mem.tokens:
        r = plan.max_running or mem.req_pool
        soft["kv_tokens_per_request_short"] = max(
            i + 0.7 * o - mem.tokens / max(min(r, n), 1) for n, i, o in workloads)
    warns += _warnings(model, hw, plan, mem, soft, flags)
    scales = {**dict.fromkeys(GPU_MEMORY_CONSTRAINTS, max(mem.f0 / GB, 1.0)), "kv_tokens_short": max(max_req, 1),
              "context_len_short": max(max_req, 1), "cpuinfer_over_cores": cpu.physical_cores}
    binding = _binding(cons, scales)
    bare_slack = band_slack = marginal = activation_test = None
    if mem.anchored:  # observed + difference, without the margin for the model's difference
        bare = gpu_constraints(mem, plan, 0.0, max_req, boundary_calibration(cal))
        bare_slack = -max(bare[k] for k in GPU_MEMORY_CONSTRAINTS)
        band_cal = band_calibration(cal)
        band = gpu_constraints(gpu_memory(model, hw, plan, band_cal, max_in), plan, 0.0, max_req, band_cal)
        band_slack = -max(band[k] for k in GPU_MEMORY_CONSTRAINTS)
        others_hold = binding in GPU_MEMORY_CONSTRAINTS and all(v <= 0 for k, v in cons.items() if k not in bare)
        marginal = others_hold and all(v <= 0 for v in bare.values())
        activation_test = others_hold and not marginal and all(v <= 0 for v in band.values())
    hints = _hints(model, hw, plan, mem, cons, cal, margin_gb, max_req, max_in) if binding else {}
    eff_margin = anchor_margin(cal, mem.spread) if mem.anchored else margin_gb * GB
    breakdown = {"weights_nonexpert": mem.w_ne, "gpu_experts": mem.experts, "staging": mem.staging, "kv": mem.kv,
                 "req_pool": mem.rtt, "cuda_graphs": mem.graphs, "activations": mem.act, "layerwise_slot": mem.slot,
                 "margin": eff_margin, "total": mem.startup + max(eff_margin, mem.act + mem.slot),
                 "available": mem.f0, "free": mem.free, "cuda_context": mem.free - mem.f0,
                 "anchor_spread": mem.spread}
    return FeasibilityReport(
        constraints=cons, soft_constraints=soft, feasible=binding is None, binding=binding,
        breakdown_gb={k: round(v / GB, 4) for k, v in breakdown.items()}, kv_capacity_tokens=mem.tokens,
        kv_capacity_requests=mem.tokens // max_req if max_req else 0, warnings=warns, hints=hints, plan=plan,
        marginal=bool(marginal), activation_test=bool(activation_test), bare_slack_gb=bare_slack,
        band_slack_gb=band_slack,
        title=f"{model.name} TP{plan.tp}, N={plan.n_gpu_experts}, T={plan.max_total_tokens}, C={plan.chunk}")


def _warnings(model: ModelSizes, hw: Hardware, plan: LaunchPlan, mem: GpuMemory, soft: Mapping[str, float],
              flags: Mapping[str, Any]) -> list[str]:
    w: list[str] = []
    cpu = hw.cpu
    if not plan.kt_enabled:
        w.append("KT is off (needs kt-weight-path plus kt-num-gpu-experts or kt-gpu-experts-ratio): "
                 "all routed experts load on the GPUs")
    else:
        if (flag_number(flags, "kt-num-gpu-experts", 0) or 0) > model.n_routed_experts:
            w.append(f"kt-num-gpu-experts above {model.n_routed_experts} experts per layer is clamped")
        if soft.get("cpuinfer_over_free_cores", 0) > 0 and (plan.cpuinfer or 0) <= cpu.physical_cores:
            w.append(f"kt-cpuinfer {plan.cpuinfer} exceeds physical cores - GPUs ({cpu.physical_cores - plan.tp}); "
                     "threads contend with the GPU schedulers")
        if soft.get("threads_per_pool_over_node", 0) > 0:
            w.append(f"{plan.cpuinfer}/{plan.threadpools} threads per pool exceed {cpu.min_cores_per_node} cores "
                     "per NUMA node")
        if plan.threadpools < cpu.numa_nodes:
            w.append(f"kt-threadpool-count {plan.threadpools} < {cpu.numa_nodes} NUMA nodes: other nodes' "
                     "memory bandwidth goes unused")
        if plan.kt_method.startswith("AMX") and cpu.avx512 and not cpu.amx:
            w.append(f"{plan.kt_method} on a CPU without AMX runs the slower AVX-512 path")
        if 0 < plan.layerwise_threshold <= plan.chunk:
            w.append(f"layerwise prefill needs {mem.slot / GB:.1f} GB per GPU at run time, not reserved at startup")
    if plan.max_total_tokens is None:
        quirk = model.attention == "mla" and mem.cell != model.sglang_kt_profile_cell(plan.tp, plan.kv_dtype_bytes)
        w.append("max-total-tokens unset: " + ("sglang-kt profiles MLA KV with a third of the real cell, so the "
                 "pool is ~3x oversized (CUDA OOM)" if quirk else "the KV pool takes everything mem-fraction-static leaves"))
    elif plan.max_total_tokens > mem.profiled:
        w.append(f"max-total-tokens {plan.max_total_tokens} exceeds the profiled {mem.profiled}: sglang clips it")
    if plan.max_running is None:
        w.append(f"max-running-requests unset: the req-to-token pool is sized for {mem.req_pool} requests "
                 f"({mem.rtt / GB:.2f} GB)")
    if soft.get("kv_tokens_per_request_short", 0) > 0:
        w.append("R x (in + 0.7 out) exceeds the KV pool: fewer requests run at once or decode retracts")
    if len({g.free_bytes for g in hw.gpus[plan.base_gpu:plan.base_gpu + plan.tp]}) > 1:
        w.append("GPUs differ in free memory; the smallest is used (sglang takes the minimum over ranks)")
    if flag_on(flags, "enable-dp-attention"):
        w.append("enable-dp-attention is not modelled; memory figures assume plain TP")
    return w


def _fits(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, margin_gb: float,
          max_req: int, max_in: int) -> bool:
    mem = gpu_memory(model, hw, plan, cal, max_in)
    return all(v <= 0 for v in gpu_constraints(mem, plan, margin_gb, max_req, cal).values())


def _largest_n(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, margin_gb: float,
               max_req: int, max_in: int) -> int | None:
    for n in range(model.n_routed_experts, -1, -1):  # memory need is not monotone in N when KV is profiled
        if _fits(model, hw, replace(plan, kt_enabled=True, n_gpu_experts=n), cal, margin_gb, max_req, max_in):
            return n
    return None


def _hints(model: ModelSizes, hw: Hardware, plan: LaunchPlan, mem: GpuMemory, cons: Mapping[str, float],
           cal: MemoryCalibration, margin: float, max_req: int, max_in: int) -> dict[str, str]:
    h: dict[str, str] = {}
    cpu = hw.cpu
    gpu_bad = [k for k in (*GPU_MEMORY_CONSTRAINTS, "kv_tokens_short") if cons.get(k, 0) > 0]
    if gpu_bad and cons["tp_over_gpus"] <= 0:
        opts = []
        n = _largest_n(model, hw, plan, cal, margin, max_req, max_in) if plan.kt_enabled else None
        if n is not None and n < plan.n_gpu_experts:
            opts.append(f"lower kt-num-gpu-experts to {n}")
        elif not plan.kt_enabled:
            opts.append("offload experts: set kt-weight-path and kt-num-gpu-experts")
        excess = max(cons.get("gpu_mem_startup_gb", 0), cons.get("gpu_mem_runtime_gb", 0)) * GB
        if plan.max_total_tokens is None:
            opts.append("set max-total-tokens explicitly")
        elif excess > 0 and cons.get("gpu_mem_static_gb", 0) <= 0:
            t = int((mem.tokens * mem.cell - excess) // mem.cell) // plan.page_size * plan.page_size
            if t >= max_req:
                opts.append(f"lower max-total-tokens to {t}")
        if cons.get("gpu_mem_runtime_gb", 0) > 0 and cons.get("gpu_mem_startup_gb", 0) <= 0:
            if mem.slot:
                opts.append(f"raise kt-gpu-prefill-token-threshold above chunked-prefill-size {plan.chunk}")
            per_tok = mem.act / max(plan.chunk, 1) + (model.hidden_size * 2 if plan.kt_enabled else 0)
            c = int((plan.chunk - cons["gpu_mem_runtime_gb"] * GB / per_tok) // 256 * 256)
            if c >= 256:
                opts.append(f"lower chunked-prefill-size to {c}")
        if cons.get("gpu_mem_static_gb", 0) > 0 and mem.f0 and mem.weights / mem.f0 < 0.99:
            opts.append(f"raise mem-fraction-static to {math.ceil(mem.weights / mem.f0 * 100 + 1) / 100:.2f}")
        if cons.get("kv_tokens_short", 0) > 0 and plan.max_total_tokens is not None and plan.max_total_tokens < max_req:
            opts.insert(0, f"raise max-total-tokens to at least {max_req}")
        key = next(k for k in gpu_bad)
        h[key] = " or ".join(opts) if opts else "the model does not fit these GPUs at this TP"
    if cons.get("context_len_short", 0) > 0:
        h["context_len_short"] = f"raise context-length to at least {max_req}"
    if cons.get("tp_over_gpus", 0) > 0:
        h["tp_over_gpus"] = f"lower tensor-parallel-size to at most {len(hw.gpus[plan.base_gpu:])} (GPUs available)"
    if cons.get("tp_divides_heads", 0) > 0:
        h["tp_divides_heads"] = f"use a tensor-parallel-size that divides {model.num_attention_heads} attention heads"
    if cons.get("kt_cpuinfer_missing", 0) > 0:
        h["kt_cpuinfer_missing"] = f"set kt-cpuinfer (physical cores - GPUs = {cpu.physical_cores - plan.tp})"
    if cons.get("chunked_prefill_below_1", 0) > 0:
        h["chunked_prefill_below_1"] = "set chunked-prefill-size to a positive size; KT sizes its buffers from it"
    if cons.get("cpuinfer_over_cores", 0) > 0:
        h["cpuinfer_over_cores"] = (f"lower kt-cpuinfer to at most {cpu.physical_cores} physical cores "
                                    f"(seed rule: {cpu.physical_cores - plan.tp})")
    if cons.get("cpuinfer_below_threadpools", 0) > 0:
        h["cpuinfer_below_threadpools"] = f"raise kt-cpuinfer to at least kt-threadpool-count {plan.threadpools}"
    if cons.get("threadpool_over_numa", 0) > 0:
        h["threadpool_over_numa"] = f"set kt-threadpool-count to {cpu.numa_nodes} (one pool per NUMA node)"
    if cons.get("threadpool_divides_intermediate", 0) > 0:
        ok = [p for p in range(min(plan.threadpools, cpu.numa_nodes), 0, -1) if model.moe_intermediate_size % p == 0]
        h["threadpool_divides_intermediate"] = (f"use a kt-threadpool-count dividing moe_intermediate_size "
                                                f"{model.moe_intermediate_size}, e.g. {ok[0]}")
    if cons.get("cpu_isa_missing", 0) > 0:
        h["cpu_isa_missing"] = f"{plan.kt_method} needs AVX-512; use kt-method BF16 or LLAMAFILE"
    if cons.get("cpu_ram_gb", 0) > 0:
        need = model.cpu_expert_bytes_total(plan.kt_method) / GB
        h["cpu_ram_gb"] = (f"{plan.kt_method} experts need {need:.0f} GB of host RAM (AMXINT4: "
                           f"{model.cpu_expert_bytes_total('AMXINT4') / GB:.0f} GB); free RAM or use a smaller kt-method")
    return h


def max_gpu_experts(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload], *,
                    margin_gb: float = 2.0, calibration: MemoryCalibration | None = None) -> int:
    """Largest kt-num-gpu-experts whose GPU memory and KV constraints hold with the other flags
    as given (KT assumed on); 0 when none does."""
    plan = resolve_launch(model, hw, flags, workloads)
    max_req = max((i + o for _, i, o in workloads), default=0)
    max_in = max((i for _, i, _ in workloads), default=0)
    n = _largest_n(model, hw, plan, calibration or MemoryCalibration(), margin_gb, max_req, max_in)
    return n or 0
