"""The per-GPU memory breakdown of one launch and the GPU-memory constraints on it."""
from __future__ import annotations

from dataclasses import dataclass

from tuner.feasibility.calibration import MemoryCalibration, anchor_margin
from tuner.feasibility.plan import GB, LaunchPlan
from tuner.machine.hardware import Hardware
from tuner.machine.model import ModelSizes


def prefill_bytes_per_token(model: ModelSizes, tp: int) -> float:
    """Activation bytes per chunk token at TP: hidden-state copies, fused-MoE caches
    (tokens×top-k×(H + 3I/TP)), attention projections and the dense/shared MLP."""
    m, b = model, 2
    heads = max(1, m.num_attention_heads // tp)
    moe = m.top_k * (m.hidden_size + 3 * m.moe_intermediate_size / tp) * b if m.num_moe_layers else 0.0
    if m.attention == "mla":
        attn = heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim) * b
        attn += (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim) * b
    else:
        attn = 2 * (heads + 2 * max(1, m.num_kv_heads // tp)) * m.head_dim * b
    mlp = 3 * max(m.dense_intermediate_size, m.shared_intermediate_size) / tp * b
    return 8 * m.hidden_size * b + moe + attn + mlp


def decode_bytes_per_token(model: ModelSizes, tp: int) -> float:
    """Per decode slot: the prefill working set plus fp32 logits over the gathered vocabulary."""
    return prefill_bytes_per_token(model, tp) + model.vocab_size * (4 + 2 / tp)


@dataclass(frozen=True)
class GpuMemory:
    free: float
    f0: float
    w_ne: float
    experts: float
    staging: float
    kv: float
    rtt: float
    graphs: float
    act: float
    slot: float
    tokens: int
    profiled: int
    cell: int
    req_pool: int
    rest: float = 0.0  # what mem-fraction-static leaves the KV profiler (bytes)
    prof_cell: int = 1
    spread: float = 0.0  # anchored: model difference from the reference launch (bytes)
    anchored: bool = False

    @property
    def weights(self) -> float:
        return self.w_ne + self.experts + self.staging

    @property
    def startup(self) -> float:
        return self.weights + self.kv + self.rtt + self.graphs


def gpu_memory(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, max_input: int) -> GpuMemory:
    used = hw.gpus[plan.base_gpu:plan.base_gpu + plan.tp]
    free = float(min((g.free_bytes for g in used), default=0))
    f0 = max(free - cal.cuda_context_gb * GB, 0.0)
    anchored = cal.f0_gb is not None and cal.ref_tp == plan.tp
    if anchored:
        f0 = cal.f0_gb * GB  # type: ignore[operator]
    tp, h = plan.tp, model.hidden_size
    chunk = plan.chunk if plan.chunk > 0 else max(max_input, 1)
    w_ne = cal.nonexpert_weight_gb * GB if cal.nonexpert_weight_gb is not None else model.nonexpert_bytes_per_gpu(tp)
    experts = model.gpu_expert_bytes_per_gpu(plan.n_gpu_experts, tp)
    staging = chunk * h * 2.0 if plan.kt_enabled else 0.0
    cell = model.kv_bytes_per_token(tp, plan.kv_dtype_bytes)
    prof_cell = model.sglang_kt_profile_cell(tp, plan.kv_dtype_bytes) if cal.sglang_kt_profile_quirk else cell
    w_off = cal.weights_offset_gb * GB if anchored else 0.0
    rest = plan.mfs * f0 - (w_ne + w_off + experts + staging)
    page = plan.page_size
    profiled = int(rest // prof_cell) // page * page if rest > 0 else 0
    tokens = profiled if plan.max_total_tokens is None else min(plan.max_total_tokens // page * page, profiled)
    req_pool = plan.max_running or min(max(int(tokens / max(plan.context_len, 1) * 512), 2048), 4096)
    bs = min(plan.graph_max_bs, req_pool) if plan.graphs else 0
    g1 = cal.graph_bytes_per_batch if cal.graph_bytes_per_batch is not None else cal.graph_scale * decode_bytes_per_token(model, tp)
    graphs = (cal.runtime_base_gb + (cal.nccl_gb if tp > 1 else 0.0)) * GB + g1 * bs
    alpha = (cal.activation_bytes_per_token if cal.activation_bytes_per_token is not None
             else cal.activation_scale * prefill_bytes_per_token(model, tp))
    if cal.act_upper_bytes_per_token is not None:
        alpha = min(alpha, cal.act_upper_bytes_per_token)
    alpha *= cal.activation_share
    if cal.act_lower_bytes_per_token is not None:
        alpha = max(alpha, cal.act_lower_bytes_per_token * 1.05)
    slot = model.layerwise_slot_bytes(tp) if plan.kt_enabled and 0 < plan.layerwise_threshold <= chunk else 0.0
    rtt = req_pool * (plan.context_len + 4) * 4.0
    spread = 0.0
    if anchored:
        spread = (abs(w_ne + experts + staging - cal.ref_weights_gb * GB) + abs(tokens * cell - cal.ref_kv_gb * GB)
                  + abs(rtt - cal.ref_rtt_gb * GB) + abs(graphs - cal.ref_graphs_gb * GB)
                  + alpha * abs(chunk - cal.ref_chunk))
        graphs += cal.graphs_offset_gb * GB
        if cal.graph_slope_bytes is not None and bs and cal.graph_ref_bs:
            graphs += (cal.graph_slope_bytes - g1) * (bs - cal.graph_ref_bs)
    return GpuMemory(free=free, f0=f0, w_ne=w_ne + w_off, experts=experts, staging=staging, kv=float(tokens * cell),
                rtt=rtt, graphs=graphs, act=alpha * chunk, slot=slot,
                tokens=tokens, profiled=profiled, cell=cell, req_pool=req_pool, rest=rest, prof_cell=prof_cell,
                spread=spread, anchored=anchored)


def gpu_constraints(mem: GpuMemory, plan: LaunchPlan, margin_gb: float, max_req: int,
                     cal: MemoryCalibration | None = None) -> dict[str, float]:
    startup_margin, runtime_margin, less_free = margin_gb * GB, 0.0, 0.0
    if mem.anchored and cal is not None:  # observed + difference: only the difference is uncertain
        runtime_margin = anchor_margin(cal, mem.spread)
        startup_margin = less_free = runtime_margin
    out = {
        "gpu_mem_static_gb": (mem.weights - plan.mfs * mem.f0) / GB,
        "gpu_mem_startup_gb": (mem.startup + startup_margin - mem.f0) / GB,
        "gpu_mem_runtime_gb": (mem.startup + mem.act + mem.slot + runtime_margin - mem.f0) / GB,
    }
    if max_req:
        out["kv_tokens_short"] = float(max_req - kv_tokens_with_less_free(mem, plan, less_free))
    return out


def kv_tokens_with_less_free(mem: GpuMemory, plan: LaunchPlan, less: float) -> int:
    """KV tokens the pool gets if free memory at start-up is ``less`` bytes below the prediction
    (the anchored margin: the uncertainty of free memory and of the model's differences): where
    the profile, not max-total-tokens, sizes the pool, that uncertainty shrinks it too."""
    rest = mem.rest - plan.mfs * less
    page = plan.page_size
    profiled = int(rest // mem.prof_cell) // page * page if rest > 0 else 0
    return profiled if plan.max_total_tokens is None else min(plan.max_total_tokens // page * page, profiled)


GPU_MEMORY_CONSTRAINTS = ("gpu_mem_static_gb", "gpu_mem_startup_gb", "gpu_mem_runtime_gb")
