"""The per-GPU memory of one launch (:class:`GpuMemory`) and the GPU-memory constraints on it.

Per-GPU memory follows sglang-kt's start-up order (``ModelRunner`` in sglang's
python/sglang/srt/model_executor/model_runner.py: load_model, init_memory_pool,
init_cuda_graphs): weights (non-expert, GPU experts, TP0 staging buffer) → KV pool (profiled
against ``mem-fraction-static``, then clipped by ``--max-total-tokens``) → req-to-token pool →
CUDA graphs; at run time the first full prefill chunk adds activations and, with layerwise
prefill, one whole MoE layer. Start-up must leave ``margin_gb`` free (room the run-time
activations need); at run time the sum itself must fit. Sizes are bytes; constraints are GB.
"""
from __future__ import annotations

from dataclasses import dataclass

from tuner.feasibility.calibration import MemoryCalibration, anchor_margin
from tuner.feasibility.plan import GB, LaunchPlan
from tuner.machine import Hardware, ModelSizes


def prefill_bytes_per_token(model: ModelSizes, tp: int) -> float:
    """Activation bytes per chunk token at TP: hidden-state copies, fused-MoE caches
    (tokens×top-k×(H + 3I/TP)), attention projections and the dense/shared MLP."""
    m, bf16 = model, 2  # bytes per activation value
    heads = max(1, m.num_attention_heads // tp)
    moe = m.top_k * (m.hidden_size + 3 * m.moe_intermediate_size / tp) * bf16 if m.num_moe_layers else 0.0
    if m.attention == "mla":
        attn = heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim) * bf16
        attn += (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim) * bf16
    else:
        attn = 2 * (heads + 2 * max(1, m.num_kv_heads // tp)) * m.head_dim * bf16
    mlp = 3 * max(m.dense_intermediate_size, m.shared_intermediate_size) / tp * bf16
    return 8 * m.hidden_size * bf16 + moe + attn + mlp


def decode_bytes_per_token(model: ModelSizes, tp: int) -> float:
    """Per decode slot: the prefill working set plus fp32 logits over the gathered vocabulary."""
    return prefill_bytes_per_token(model, tp) + model.vocab_size * (4 + 2 / tp)


@dataclass(frozen=True)
class GpuMemory:
    """Per-GPU memory of one launch at TP0 (bytes), in the order sglang-kt allocates it."""

    free: float  # free per GPU before the server starts (the smallest over its ranks)
    free_before_weights: float  # free once the CUDA context exists: what the weights load into
    nonexpert_weights: float  # anchored: plus the reference's logged-minus-modelled weights
    gpu_experts: float
    staging: float  # KT's TP0 buffer for one prefill chunk of hidden states
    kv_pool: float
    req_to_token_pool: float
    cuda_graphs: float
    activations: float  # one full prefill chunk (run time)
    layerwise_slot: float  # one whole MoE layer with layerwise prefill (run time)
    kv_tokens: int
    profiled_kv_tokens: int  # what the KV profiler allows before max-total-tokens clips it
    kv_bytes_per_token: int
    request_slots: int  # size of the req-to-token pool in requests
    left_for_kv: float = 0.0  # what mem-fraction-static leaves the KV profiler
    profiled_kv_bytes_per_token: int = 1  # the cell the profiler divides by (sglang-kt's MLA quirk)
    reference_difference: float = 0.0  # anchored: model difference from the reference launch
    anchored: bool = False

    @property
    def weights(self) -> float:
        return self.nonexpert_weights + self.gpu_experts + self.staging

    @property
    def startup(self) -> float:
        return self.weights + self.kv_pool + self.req_to_token_pool + self.cuda_graphs


def gpu_memory(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration,
               largest_input: int) -> GpuMemory:
    """The per-GPU breakdown of ``plan``; anchored (observed reference + model difference) when
    ``cal`` holds a reference launch at this TP. ``largest_input`` sizes the prefill when
    chunking is off."""
    used = hw.gpus[plan.base_gpu:plan.base_gpu + plan.tp]
    free = float(min((g.free_bytes for g in used), default=0))
    reference_free = cal.free_before_weights_gb if cal.reference_tp == plan.tp else None
    anchored = reference_free is not None
    free_before_weights = (reference_free * GB if reference_free is not None
                           else max(free - cal.cuda_context_gb * GB, 0.0))
    tp, hidden = plan.tp, model.hidden_size
    chunk = plan.chunk if plan.chunk > 0 else max(largest_input, 1)
    nonexpert = (cal.nonexpert_weight_gb * GB if cal.nonexpert_weight_gb is not None
                 else model.nonexpert_bytes_per_gpu(tp))
    experts = model.gpu_expert_bytes_per_gpu(plan.n_gpu_experts, tp)
    staging = chunk * hidden * 2.0 if plan.kt_enabled else 0.0
    kv_cell = model.kv_bytes_per_token(tp, plan.kv_dtype_bytes)
    profiled_cell = model.sglang_kt_profile_cell(tp, plan.kv_dtype_bytes) if cal.sglang_kt_profile_quirk else kv_cell
    weights_offset = cal.weights_offset_gb * GB if anchored else 0.0
    left_for_kv = plan.mfs * free_before_weights - (nonexpert + weights_offset + experts + staging)
    page = plan.page_size
    profiled = int(left_for_kv // profiled_cell) // page * page if left_for_kv > 0 else 0
    tokens = profiled if plan.max_total_tokens is None else min(plan.max_total_tokens // page * page, profiled)
    # Unset max-running-requests: sglang sizes the req-to-token pool from the KV pool, in [2048, 4096].
    request_slots = plan.max_running or min(max(int(tokens / max(plan.context_len, 1) * 512), 2048), 4096)
    graph_bs = min(plan.graph_max_bs, request_slots) if plan.graphs else 0
    graph_bytes_per_batch = (cal.graph_bytes_per_batch if cal.graph_bytes_per_batch is not None
                             else cal.graph_scale * decode_bytes_per_token(model, tp))
    graphs = (cal.runtime_base_gb + (cal.nccl_gb if tp > 1 else 0.0)) * GB + graph_bytes_per_batch * graph_bs
    activation_bytes_per_token = (cal.activation_bytes_per_token if cal.activation_bytes_per_token is not None
                                  else cal.activation_scale * prefill_bytes_per_token(model, tp))
    if cal.activation_upper_bytes_per_token is not None:
        activation_bytes_per_token = min(activation_bytes_per_token, cal.activation_upper_bytes_per_token)
    activation_bytes_per_token *= cal.activation_share
    if cal.activation_lower_bytes_per_token is not None:
        # an OOM proved them above the bound: assume a little more
        activation_bytes_per_token = max(activation_bytes_per_token, cal.activation_lower_bytes_per_token * 1.05)
    slot = model.layerwise_slot_bytes(tp) if plan.kt_enabled and 0 < plan.layerwise_threshold <= chunk else 0.0
    req_to_token = request_slots * (plan.context_len + 4) * 4.0  # one int32 per token slot of each request
    difference = 0.0
    if anchored:
        difference = (abs(nonexpert + experts + staging - cal.reference_weights_gb * GB)
                      + abs(tokens * kv_cell - cal.reference_kv_gb * GB)
                      + abs(req_to_token - cal.reference_req_to_token_gb * GB)
                      + abs(graphs - cal.reference_graphs_gb * GB)
                      + activation_bytes_per_token * abs(chunk - cal.reference_chunk))
        graphs += cal.graphs_offset_gb * GB
        if cal.graph_slope_bytes is not None and graph_bs and cal.reference_graph_bs:
            graphs += (cal.graph_slope_bytes - graph_bytes_per_batch) * (graph_bs - cal.reference_graph_bs)
    return GpuMemory(free=free, free_before_weights=free_before_weights, nonexpert_weights=nonexpert + weights_offset,
                     gpu_experts=experts, staging=staging, kv_pool=float(tokens * kv_cell),
                     req_to_token_pool=req_to_token, cuda_graphs=graphs,
                     activations=activation_bytes_per_token * chunk, layerwise_slot=slot, kv_tokens=tokens,
                     profiled_kv_tokens=profiled, kv_bytes_per_token=kv_cell, request_slots=request_slots,
                     left_for_kv=left_for_kv, profiled_kv_bytes_per_token=profiled_cell,
                     reference_difference=difference, anchored=anchored)


# GPU-memory constraints, in GB: weights within mem-fraction-static, start-up within free memory,
# and start-up plus the run-time terms within free memory.
GPU_MEMORY_CONSTRAINTS = ("gpu_mem_static_gb", "gpu_mem_startup_gb", "gpu_mem_runtime_gb")


def gpu_constraints(mem: GpuMemory, plan: LaunchPlan, margin_gb: float, largest_request: int,
                    cal: MemoryCalibration | None = None) -> dict[str, float]:
    """The GPU-memory constraints (GB, <= 0 holds) and, with a request size, the KV-token shortfall.
    Unanchored, start-up must leave ``margin_gb`` free; anchored, both phases keep the anchored
    margin and the KV pool is judged with that much less free memory."""
    startup_margin, runtime_margin, less_free = margin_gb * GB, 0.0, 0.0
    if mem.anchored and cal is not None:  # observed + difference: only the difference is uncertain
        runtime_margin = anchor_margin(cal, mem.reference_difference)
        startup_margin = less_free = runtime_margin
    out = {
        "gpu_mem_static_gb": (mem.weights - plan.mfs * mem.free_before_weights) / GB,
        "gpu_mem_startup_gb": (mem.startup + startup_margin - mem.free_before_weights) / GB,
        "gpu_mem_runtime_gb": (mem.startup + mem.activations + mem.layerwise_slot + runtime_margin
                               - mem.free_before_weights) / GB,
    }
    if largest_request:
        out["kv_tokens_short"] = float(largest_request - kv_tokens_with_less_free(mem, plan, less_free))
    return out


def kv_tokens_with_less_free(mem: GpuMemory, plan: LaunchPlan, less: float) -> int:
    """KV tokens the pool gets if free memory at start-up is ``less`` bytes below the prediction
    (the anchored margin: the uncertainty of free memory and of the model's differences): where
    the profile, not max-total-tokens, sizes the pool, that uncertainty shrinks it too."""
    left_for_kv = mem.left_for_kv - plan.mfs * less
    page = plan.page_size
    profiled = int(left_for_kv // mem.profiled_kv_bytes_per_token) // page * page if left_for_kv > 0 else 0
    return profiled if plan.max_total_tokens is None else min(plan.max_total_tokens // page * page, profiled)
