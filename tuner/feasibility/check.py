"""The verdict on one flag set (:func:`check`, :class:`FeasibilityReport`): signed constraints,
≤ 0 feasible, in natural units (GB, tokens, threads, ...), the binding one, fix hints and
warnings; and the largest kt-num-gpu-experts that fits (:func:`max_gpu_experts`).
``soft_constraints`` mark slow-but-working regions (retraction, oversubscribed threads)."""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tuner.feasibility.calibration import (
    MemoryCalibration,
    anchor_margin,
    lower_activations_calibration,
    without_margin_calibration,
)
from tuner.feasibility.memory import GPU_MEMORY_CONSTRAINTS, GpuMemory, gpu_constraints, gpu_memory
from tuner.feasibility.plan import GB, LaunchPlan, Workload, flag_number, flag_on, resolve_launch
from tuner.machine import Hardware, ModelSizes


@dataclass(frozen=True)
class FeasibilityReport:
    """The verdict for one flag set. ``constraints`` decide ``feasible`` (all ≤ 0);
    ``breakdown_gb`` is per GPU (TP0, which also holds the KT staging buffer); its
    ``anchor_spread`` is the anchored model's difference from its reference launch."""

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
    # Anchored only; both name launches inside the margin, which test the memory model.
    # Not feasible only because of the safety margin: the expected footprint fits without it.
    fits_without_margin: bool = False
    # Not feasible, nor fits_without_margin, but fits without the margin if activations are at
    # LOWER_ACTIVATION_SHARE of their estimate.
    fits_with_lower_activations: bool = False
    slack_without_margin_gb: float | None = None  # predicted GPU-memory slack without the margin
    slack_with_lower_activations_gb: float | None = None  # the same with activations that low
    # Anchored only: GB the forwards take beyond start-up (a full prefill chunk's activations,
    # the layerwise slot, what failures added), no margin and no allowance for the start-up draw
    runtime_need_gb: float | None = None

    def fix_hint(self, changeable: Collection[str] | None = None) -> str:
        """The smallest change that makes room, binding constraint first; "" when feasible.
        ``changeable``: the flags the caller can change; a fix naming another flag is left out
        (all of them left out: the first, marked as a flag to add)."""
        order = [self.binding] + [k for k in self.hints if k != self.binding]
        if changeable is None:
            return "; ".join(self.hints[k] for k in order if k in self.hints)
        fixes = [f for k in order if k in self.hints for f in self.hints[k].split(" or ")]
        kept = [f for f in fixes if _flag_of(f) is None or _flag_of(f) in changeable]
        if kept or not fixes:
            return " or ".join(kept)
        return f"{fixes[0]} (not a flag of the space: add {_flag_of(fixes[0])} to server.args first)"

    def explain(self, changeable: Collection[str] | None = None) -> str:
        """The report as text: the memory breakdown against the budget it is compared with, the
        KV pool and what sized it, every constraint, the warnings and the fix (naming only
        ``changeable`` flags where given)."""
        b = self.breakdown_gb
        lines = [f"{self.title}: {'fits' if self.feasible else 'DOES NOT FIT'}"
                 + ("" if self.binding is None else f" (binding: {self.binding} = {self.constraints[self.binding]:+.3g})")]
        lines.append("GPU memory per GPU (TP0, GB):")
        for key in ("weights_nonexpert", "gpu_experts", "staging", "kv", "req_pool", "cuda_graphs",
                    "activations", "layerwise_slot", "margin"):
            lines.append(f"  {key:<18} {b[key]:8.2f}")
        lines.append(f"  {'total':<18} {b['total']:8.2f}   (startup terms + max(margin, activations + slot))")
        lines.append(f"  {'available':<18} {b['available']:8.2f}   (free {b['free']:.2f} - CUDA context {b['cuda_context']:.2f})")
        weights = b["weights_nonexpert"] + b["gpu_experts"] + b["staging"]
        if self.plan is not None:
            cap = self.plan.mfs * b["available"]
            how = "sglang's default for this GPU" if self.plan.mfs_auto else "as set"
            lines.append(f"  {'static cap':<18} {cap:8.2f}   (mem-fraction-static {self.plan.mfs:.3g} x available, {how}: "
                         f"weights {weights:.2f} must fit under it, the KV pool gets what is left)")
        lines.append(f"KV pool: {self.kv_capacity_tokens} tokens, {self.kv_capacity_requests} of the largest request at once"
                     + self._kv_why(weights))
        lines.append("Constraints (<= 0 holds):")
        for k, v in {**self.constraints, **self.soft_constraints}.items():
            tag = "" if v <= 0 else ("  VIOLATED" if k in self.constraints else "  (soft: slower, still runs)")
            lines.append(f"  {k:<34} {v:+10.3f}{tag}")
        lines += [f"warning: {w}" for w in self.warnings]
        if not self.feasible:
            lines.append(f"fix: {self.fix_hint(changeable) or 'no flag of the space makes room'}")
        return "\n".join(lines)

    def _kv_why(self, weights_gb: float) -> str:
        """What sized the KV pool, most of all why it is empty."""
        if self.plan is None:
            return ""
        cap = self.plan.mfs * self.breakdown_gb["available"]
        if self.kv_capacity_tokens == 0:
            if weights_gb >= cap:
                return (f" (0: the weights, {weights_gb:.2f} GB, fill the mem-fraction-static cap of {cap:.2f} GB; "
                        "fewer GPU experts or a higher mem-fraction-static leave room)")
            return f" (0: what the cap leaves, {cap - weights_gb:.2f} GB, holds less than one page of KV)"
        if self.plan.max_total_tokens is not None and self.kv_capacity_tokens >= self.plan.max_total_tokens // max(self.plan.page_size, 1) * self.plan.page_size:
            return f" (sized by max-total-tokens {self.plan.max_total_tokens})"
        return f" (what the mem-fraction-static cap leaves after the weights: {cap - weights_gb:.2f} GB)"


def _flag_of(fix: str) -> str | None:
    """The first launch flag a fix names ("lower chunked-prefill-size to 2048" → chunked-prefill-size)."""
    m = _FLAG_IN_FIX.search(fix)
    return m[0] if m else None


_FLAG_IN_FIX = re.compile(r"\b[a-z][a-z0-9]*(?:-[a-z0-9]+)+\b")


# Failures a launch meets before memory matters, in the order it meets them.
_STRUCTURAL = ("tp_over_gpus", "tp_divides_heads", "kt_cpuinfer_missing", "cpu_isa_missing", "chunked_prefill_below_1",
               "threadpool_over_numa", "cpuinfer_below_threadpools", "threadpool_divides_intermediate", "cpu_ram_gb")


def _binding(constraints: Mapping[str, float], scales: Mapping[str, float]) -> str | None:
    """The first violated structural constraint, else the one with the largest excess relative
    to its scale. A KV shortfall caused by weights leaving no room counts as the memory one."""
    for key in _STRUCTURAL:
        if constraints.get(key, 0) > 0:
            return key
    bad = {k: v / max(scales.get(k, 1.0), 1e-9) for k, v in constraints.items() if v > 0}
    if "kv_tokens_short" in bad and any(k in bad for k in GPU_MEMORY_CONSTRAINTS):
        del bad["kv_tokens_short"]
    return max(bad, key=lambda k: bad[k]) if bad else None


def check(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload], *,
          margin_gb: float = 2.0, calibration: MemoryCalibration | None = None) -> FeasibilityReport:
    """Predict whether ``flags`` (dashed CLI names, no leading dashes) fit these GPUs, CPUs and
    host RAM for ``workloads``; the memory model is :mod:`tuner.feasibility.memory`."""
    cal = calibration or MemoryCalibration()
    plan = resolve_launch(model, hw, flags, workloads)
    largest_request = max((i + o for _, i, o in workloads), default=0)
    largest_input = max((i for _, i, _ in workloads), default=0)
    mem = gpu_memory(model, hw, plan, cal, largest_input)
    cpu = hw.cpu
    constraints: dict[str, float] = {"tp_over_gpus": float(plan.tp - len(hw.gpus[plan.base_gpu:]))}
    heads_left = model.num_attention_heads % plan.tp
    if model.attention == "gqa" and model.num_kv_heads % plan.tp and plan.tp % model.num_kv_heads:
        heads_left = max(heads_left, model.num_kv_heads % plan.tp)
    constraints["tp_divides_heads"] = float(heads_left)
    constraints.update(gpu_constraints(mem, plan, margin_gb, largest_request, cal))
    if largest_request:
        constraints["context_len_short"] = float(largest_request - plan.context_len)
    soft: dict[str, float] = {}
    warns: list[str] = []
    if plan.kt_enabled:
        threads = plan.cpuinfer or 0
        constraints["kt_cpuinfer_missing"] = 0.0 if plan.cpuinfer else 1.0
        constraints["chunked_prefill_below_1"] = float(1 - plan.chunk)
        constraints["cpuinfer_over_cores"] = float(threads - cpu.physical_cores)
        constraints["cpuinfer_below_threadpools"] = float(plan.threadpools - threads)
        constraints["threadpool_over_numa"] = float(plan.threadpools - cpu.numa_nodes)
        constraints["threadpool_divides_intermediate"] = float(model.moe_intermediate_size % max(plan.threadpools, 1))
        if plan.kt_method.startswith("AMX"):
            constraints["cpu_isa_missing"] = 0.0 if cpu.avx512 else 1.0
        host = model.cpu_expert_bytes_total(plan.kt_method) + (cal.host_base_gb + cal.host_gb_per_gpu * plan.tp) * GB
        constraints["cpu_ram_gb"] = (host - (hw.ram_available_bytes or hw.ram_bytes)) / GB
        soft["cpuinfer_over_free_cores"] = float(threads - (cpu.physical_cores - plan.tp))
        soft["threads_per_pool_over_node"] = threads / max(plan.threadpools, 1) - cpu.min_cores_per_node
    if workloads and mem.kv_tokens:
        running = plan.max_running or mem.request_slots
        soft["kv_tokens_per_request_short"] = max(
            i + 0.7 * o - mem.kv_tokens / max(min(running, n), 1) for n, i, o in workloads)
    warns += _warnings(model, hw, plan, mem, soft, flags)
    scales = {**dict.fromkeys(GPU_MEMORY_CONSTRAINTS, max(mem.free_before_weights / GB, 1.0)),
              "kv_tokens_short": max(largest_request, 1), "context_len_short": max(largest_request, 1),
              "cpuinfer_over_cores": cpu.physical_cores}
    binding = _binding(constraints, scales)
    slack_without_margin = slack_with_lower_activations = fits_without_margin = fits_with_lower_activations = None
    runtime_need = None
    if mem.anchored:  # observed + difference, without the margin for the model's difference
        runtime_need = (mem.activations + mem.layerwise_slot) / GB + cal.anchor_extra_gb
        without_margin = gpu_constraints(mem, plan, 0.0, largest_request, without_margin_calibration(cal))
        slack_without_margin = -max(without_margin[k] for k in GPU_MEMORY_CONSTRAINTS)
        lower_activations_cal = lower_activations_calibration(cal)
        lower_activations = gpu_constraints(gpu_memory(model, hw, plan, lower_activations_cal, largest_input), plan,
                                            0.0, largest_request, lower_activations_cal)
        slack_with_lower_activations = -max(lower_activations[k] for k in GPU_MEMORY_CONSTRAINTS)
        others_hold = (binding in GPU_MEMORY_CONSTRAINTS
                       and all(v <= 0 for k, v in constraints.items() if k not in without_margin))
        fits_without_margin = others_hold and all(v <= 0 for v in without_margin.values())
        fits_with_lower_activations = (others_hold and not fits_without_margin
                                       and all(v <= 0 for v in lower_activations.values()))
    hints = _hints(model, hw, plan, mem, constraints, cal, margin_gb, largest_request, largest_input) if binding else {}
    margin_bytes = anchor_margin(cal, mem.reference_difference) if mem.anchored else margin_gb * GB
    breakdown = {"weights_nonexpert": mem.nonexpert_weights, "gpu_experts": mem.gpu_experts, "staging": mem.staging,
                 "kv": mem.kv_pool, "req_pool": mem.req_to_token_pool, "cuda_graphs": mem.cuda_graphs,
                 "activations": mem.activations, "layerwise_slot": mem.layerwise_slot, "margin": margin_bytes,
                 "total": mem.startup + max(margin_bytes, mem.activations + mem.layerwise_slot),
                 "available": mem.free_before_weights, "free": mem.free,
                 "cuda_context": mem.free - mem.free_before_weights, "anchor_spread": mem.reference_difference}
    return FeasibilityReport(
        constraints=constraints, soft_constraints=soft, feasible=binding is None, binding=binding,
        breakdown_gb={k: round(v / GB, 4) for k, v in breakdown.items()}, kv_capacity_tokens=mem.kv_tokens,
        kv_capacity_requests=mem.kv_tokens // largest_request if largest_request else 0, warnings=warns, hints=hints,
        plan=plan, fits_without_margin=bool(fits_without_margin), fits_with_lower_activations=bool(fits_with_lower_activations),
        slack_without_margin_gb=slack_without_margin, slack_with_lower_activations_gb=slack_with_lower_activations,
        runtime_need_gb=runtime_need, title=f"{model.name} TP{plan.tp}, N={plan.n_gpu_experts}, T={plan.max_total_tokens}, C={plan.chunk}")


def _warnings(model: ModelSizes, hw: Hardware, plan: LaunchPlan, mem: GpuMemory, soft: Mapping[str, float],
              flags: Mapping[str, Any]) -> list[str]:
    """What runs, but slower or differently than the flags suggest."""
    out: list[str] = []
    cpu = hw.cpu
    if not plan.kt_enabled:
        out.append("KT is off (needs kt-weight-path plus kt-num-gpu-experts or kt-gpu-experts-ratio): "
                 "all routed experts load on the GPUs")
    else:
        if (flag_number(flags, "kt-num-gpu-experts", 0) or 0) > model.n_routed_experts:
            out.append(f"kt-num-gpu-experts above {model.n_routed_experts} experts per layer is clamped")
        if soft.get("cpuinfer_over_free_cores", 0) > 0 and (plan.cpuinfer or 0) <= cpu.physical_cores:
            out.append(f"kt-cpuinfer {plan.cpuinfer} exceeds physical cores - GPUs ({cpu.physical_cores - plan.tp}); "
                     "threads contend with the GPU schedulers")
        if soft.get("threads_per_pool_over_node", 0) > 0:
            out.append(f"{plan.cpuinfer}/{plan.threadpools} threads per pool exceed {cpu.min_cores_per_node} cores "
                     "per NUMA node")
        if plan.threadpools < cpu.numa_nodes:
            out.append(f"kt-threadpool-count {plan.threadpools} < {cpu.numa_nodes} NUMA nodes: other nodes' "
                     "memory bandwidth goes unused")
        if plan.kt_method.startswith("AMX") and cpu.avx512 and not cpu.amx:
            out.append(f"{plan.kt_method} on a CPU without AMX runs the slower AVX-512 path")
        if 0 < plan.layerwise_threshold <= plan.chunk:
            out.append(f"layerwise prefill needs {mem.layerwise_slot / GB:.1f} GB per GPU at run time, not reserved at startup")
    if plan.max_total_tokens is None:
        quirk = model.attention == "mla" and mem.kv_bytes_per_token != model.sglang_kt_profile_cell(plan.tp, plan.kv_dtype_bytes)
        out.append("max-total-tokens unset: " + ("sglang-kt profiles MLA KV with a third of the real cell, so the "
                 "pool is ~3x oversized (CUDA OOM)" if quirk else "the KV pool takes everything mem-fraction-static leaves"))
    elif plan.max_total_tokens > mem.profiled_kv_tokens:
        out.append(f"max-total-tokens {plan.max_total_tokens} exceeds the profiled {mem.profiled_kv_tokens}: sglang clips it")
    if plan.max_running is None:
        out.append(f"max-running-requests unset: the req-to-token pool is sized for {mem.request_slots} requests "
                 f"({mem.req_to_token_pool / GB:.2f} GB)")
    if soft.get("kv_tokens_per_request_short", 0) > 0:
        out.append("R x (in + 0.7 out) exceeds the KV pool: fewer requests run at once or decode retracts")
    if len({g.free_bytes for g in hw.gpus[plan.base_gpu:plan.base_gpu + plan.tp]}) > 1:
        out.append("GPUs differ in free memory; the smallest is used (sglang takes the minimum over ranks)")
    if flag_on(flags, "enable-dp-attention"):
        out.append("enable-dp-attention is not modelled; memory figures assume plain TP")
    return out


def _fits(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, margin_gb: float,
          largest_request: int, largest_input: int) -> bool:
    """Whether the GPU-memory and KV constraints of ``plan`` hold."""
    mem = gpu_memory(model, hw, plan, cal, largest_input)
    return all(v <= 0 for v in gpu_constraints(mem, plan, margin_gb, largest_request, cal).values())


def _largest_gpu_experts(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, margin_gb: float,
               largest_request: int, largest_input: int) -> int | None:
    """The largest kt-num-gpu-experts for which ``plan`` (KT on) fits; None when none does."""
    for experts in range(model.n_routed_experts, -1, -1):  # memory need is not monotone in N when KV is profiled
        if _fits(model, hw, replace(plan, kt_enabled=True, n_gpu_experts=experts), cal, margin_gb, largest_request,
                 largest_input):
            return experts
    return None


def _hints(model: ModelSizes, hw: Hardware, plan: LaunchPlan, mem: GpuMemory, constraints: Mapping[str, float],
           cal: MemoryCalibration, margin: float, largest_request: int, largest_input: int) -> dict[str, str]:
    """The smallest change that would make room, per violated constraint (the GPU-memory ones
    share one hint, under the first of them)."""
    hints: dict[str, str] = {}
    cpu = hw.cpu
    gpu_bad = [k for k in (*GPU_MEMORY_CONSTRAINTS, "kv_tokens_short") if constraints.get(k, 0) > 0]
    if gpu_bad and constraints["tp_over_gpus"] <= 0:
        fixes: list[str] = []
        experts = (_largest_gpu_experts(model, hw, plan, cal, margin, largest_request, largest_input)
                   if plan.kt_enabled else None)
        if experts is not None and experts < plan.n_gpu_experts:
            fixes.append(f"lower kt-num-gpu-experts to {experts}")
        elif not plan.kt_enabled:
            fixes.append("offload experts: set kt-weight-path and kt-num-gpu-experts")
        excess = max(constraints.get("gpu_mem_startup_gb", 0), constraints.get("gpu_mem_runtime_gb", 0)) * GB
        if plan.max_total_tokens is None:
            fixes.append("set max-total-tokens explicitly")
        elif excess > 0 and constraints.get("gpu_mem_static_gb", 0) <= 0:
            cell, page = mem.kv_bytes_per_token, plan.page_size
            tokens = int((mem.kv_tokens * cell - excess) // cell) // page * page
            if tokens >= largest_request:
                fixes.append(f"lower max-total-tokens to {tokens}")
        if constraints.get("gpu_mem_runtime_gb", 0) > 0 and constraints.get("gpu_mem_startup_gb", 0) <= 0:
            if mem.layerwise_slot:
                fixes.append(f"raise kt-gpu-prefill-token-threshold above chunked-prefill-size {plan.chunk}")
            staging_per_token = model.hidden_size * 2 if plan.kt_enabled else 0
            bytes_per_chunk_token = mem.activations / max(plan.chunk, 1) + staging_per_token
            chunk = int((plan.chunk - constraints["gpu_mem_runtime_gb"] * GB / bytes_per_chunk_token) // 256 * 256)
            if chunk >= 256:
                fixes.append(f"lower chunked-prefill-size to {chunk}")
        free = mem.free_before_weights
        if constraints.get("gpu_mem_static_gb", 0) > 0 and free and mem.weights / free < 0.99:
            fixes.append(f"raise mem-fraction-static to {math.ceil(mem.weights / free * 100 + 1) / 100:.2f}")
        if (constraints.get("kv_tokens_short", 0) > 0 and plan.max_total_tokens is not None
                and plan.max_total_tokens < largest_request):
            fixes.insert(0, f"raise max-total-tokens to at least {largest_request}")
        key = next(k for k in gpu_bad)
        hints[key] = " or ".join(fixes) if fixes else "the model does not fit these GPUs at this TP"
    if constraints.get("context_len_short", 0) > 0:
        hints["context_len_short"] = f"raise context-length to at least {largest_request}"
    if constraints.get("tp_over_gpus", 0) > 0:
        hints["tp_over_gpus"] = f"lower tensor-parallel-size to at most {len(hw.gpus[plan.base_gpu:])} (GPUs available)"
    if constraints.get("tp_divides_heads", 0) > 0:
        hints["tp_divides_heads"] = f"use a tensor-parallel-size that divides {model.num_attention_heads} attention heads"
    if constraints.get("kt_cpuinfer_missing", 0) > 0:
        hints["kt_cpuinfer_missing"] = f"set kt-cpuinfer (physical cores - GPUs = {cpu.physical_cores - plan.tp})"
    if constraints.get("chunked_prefill_below_1", 0) > 0:
        hints["chunked_prefill_below_1"] = "set chunked-prefill-size to a positive size; KT sizes its buffers from it"
    if constraints.get("cpuinfer_over_cores", 0) > 0:
        hints["cpuinfer_over_cores"] = (f"lower kt-cpuinfer to at most {cpu.physical_cores} physical cores "
                                    f"(seed rule: {cpu.physical_cores - plan.tp})")
    if constraints.get("cpuinfer_below_threadpools", 0) > 0:
        hints["cpuinfer_below_threadpools"] = f"raise kt-cpuinfer to at least kt-threadpool-count {plan.threadpools}"
    if constraints.get("threadpool_over_numa", 0) > 0:
        hints["threadpool_over_numa"] = f"set kt-threadpool-count to {cpu.numa_nodes} (one pool per NUMA node)"
    if constraints.get("threadpool_divides_intermediate", 0) > 0:
        ok = [p for p in range(min(plan.threadpools, cpu.numa_nodes), 0, -1) if model.moe_intermediate_size % p == 0]
        hints["threadpool_divides_intermediate"] = (f"use a kt-threadpool-count dividing moe_intermediate_size "
                                                f"{model.moe_intermediate_size}, e.g. {ok[0]}")
    if constraints.get("cpu_isa_missing", 0) > 0:
        hints["cpu_isa_missing"] = f"{plan.kt_method} needs AVX-512; use kt-method BF16/LLAMAFILE"
    if constraints.get("cpu_ram_gb", 0) > 0:
        need = model.cpu_expert_bytes_total(plan.kt_method) / GB
        hints["cpu_ram_gb"] = (f"{plan.kt_method} experts need {need:.0f} GB of host RAM (AMXINT4: "
                           f"{model.cpu_expert_bytes_total('AMXINT4') / GB:.0f} GB); free RAM or use a smaller kt-method")
    return hints


def max_gpu_experts(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload], *,
                    margin_gb: float = 2.0, calibration: MemoryCalibration | None = None) -> int:
    """Largest kt-num-gpu-experts whose GPU memory and KV constraints hold with the other flags
    as given (KT assumed on); 0 when none does."""
    plan = resolve_launch(model, hw, flags, workloads)
    largest_request = max((i + o for _, i, o in workloads), default=0)
    largest_input = max((i for _, i, _ in workloads), default=0)
    experts = _largest_gpu_experts(model, hw, plan, calibration or MemoryCalibration(), margin_gb, largest_request,
                                   largest_input)
    return experts or 0
