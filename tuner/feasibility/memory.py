"""Pre-launch feasibility: will these launch flags fit this model on this machine?

Per-GPU memory follows sglang-kt's startup order (facts §4): weights (non-expert, GPU experts,
TP0 staging buffer) → KV pool (profiled against ``mem-fraction-static``, then clipped by
``--max-total-tokens``) → req-to-token pool → CUDA graphs; at run time the first full prefill
chunk adds activations and, with layerwise prefill, one whole MoE layer. Startup must leave
``margin_gb`` free (room the runtime activations need); at run time the sum itself must fit.
All sizes are decimal GB (1e9 B); sglang logs print GiB as "GB".

Constraints are signed, ≤ 0 feasible, in natural units (GB, tokens, threads, ...).
``soft_constraints`` mark slow-but-working regions (retraction, oversubscribed threads).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tuner.errors import ConfigError
from tuner.machine.hardware import GIB, MIB, Hardware
from tuner.machine.model import ModelSizes
from tuner.server import worst_memory_figures

GB = 1e9
Workload = tuple[int, int, int]  # (num_prompts, input_len, output_len)


BOUNDARY_F0_SD_PRIOR_GB = 0.2
BOUNDARY_SD_WEIGHT = 0.5
# Activation estimates in the field differ about fourfold (facts §4: SGLang's reserve heuristic
# assumes 1.5 MB per chunk token where the seed deployment only fits with <= 0.4 MB), so a
# launch inside the margin may test whether they are a quarter of the estimate.
BOUNDARY_ACTIVATION_SHARE = 0.25


@dataclass(frozen=True)
class MemoryCalibration:
    """Overheads the sizes in :mod:`tuner.model` do not cover; correct them during a study from
    :func:`calibrate_from_log` through :func:`calibration_from_observed`."""

    cuda_context_gb: float = 0.5  # per-process CUDA/torch context, taken from free memory
    runtime_base_gb: float = 0.2  # graph pool base, attention/cuBLAS workspaces
    nccl_gb: float = 0.25  # communicator buffers per GPU when TP > 1
    activation_scale: float = 1.3  # caching-allocator slack on the per-token activation estimate
    graph_scale: float = 2.0  # graph pools hold inputs, outputs and intermediates per batch slot
    activation_bytes_per_token: float | None = None  # measured α replaces the estimate
    graph_bytes_per_batch: float | None = None  # measured g1 replaces the estimate
    nonexpert_weight_gb: float | None = None  # measured W_nonexpert per GPU at this TP
    host_base_gb: float = 4.0  # launcher, tokenizer, detokenizer
    host_gb_per_gpu: float = 2.0  # RSS of each scheduler process (torch, CUDA libraries)
    sglang_kt_profile_quirk: bool = True  # sglang-kt 0.7.2 profiles MLA KV with a 1/3 cell
    # Anchor (see :func:`anchor_from_observed`): what a launch at TP ``ref_tp`` logged, and what the
    # plain model said for that launch. Other configs at that TP are predicted as observed + model
    # difference; the startup margin is replaced by ``anchor_rel`` x |difference| + ``anchor_extra_gb``.
    ref_tp: int | None = None
    f0_gb: float | None = None  # free per GPU before weights: mean over launches (min over ranks)
    f0_n: int = 0  # launches behind f0_gb
    f0_m2: float = 0.0  # sum of squared deviations (Welford): their spread widens the margin
    f0_sd_weight: float = 1.0  # standard deviations of free memory kept free
    f0_sd_prior_gb: float = 0.0  # prior spread of free memory (worth f0_sd_prior_df launches)
    f0_sd_prior_df: float = 0.0
    weights_offset_gb: float = 0.0  # logged weights - modelled weights at the reference
    graphs_offset_gb: float = 0.0  # logged graph memory - modelled graph memory
    ref_weights_gb: float = 0.0
    ref_kv_gb: float = 0.0
    ref_rtt_gb: float = 0.0
    ref_graphs_gb: float = 0.0
    ref_chunk: int = 0
    graph_ref_bs: int = 0  # captured batch size at the reference
    graph_slope_bytes: float | None = None  # fitted from two logged launches at different batch sizes
    anchor_rel: float = 0.05  # trust model differences to within this share
    anchor_extra_gb: float = 0.0  # grown by launches that failed for memory although predicted to fit
    act_upper_bytes_per_token: float | None = None  # a full chunk survived: α is at most this
    act_lower_bytes_per_token: float | None = None  # a chunk ran out of memory: α is above this
    activation_share: float = 1.0  # the share of the α estimate assumed (after its upper bound)


@dataclass(frozen=True)
class LaunchPlan:
    """Launch flags with SGLang's defaults applied (facts §2-3)."""

    tp: int
    base_gpu: int
    kt_enabled: bool
    n_gpu_experts: int
    kt_method: str
    cpuinfer: int | None
    threadpools: int
    chunk: int
    max_running: int | None
    max_total_tokens: int | None
    mfs: float
    mfs_auto: bool
    graph_max_bs: int
    graphs: bool
    context_len: int
    page_size: int
    kv_dtype_bytes: int
    layerwise_threshold: int


def _get(flags: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if flags.get(k) is not None:
            return flags[k]
    return None


def _num(flags: Mapping[str, Any], key: str, default: Any, kind: type = int) -> Any:
    value = _get(flags, key)
    if value is None:
        return default
    try:
        out = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"launch flag {key} must be a number; got {value!r}") from None
    if kind is int and float(value) != out:
        raise ConfigError(f"launch flag {key} must be a whole number; got {value!r}")
    return out


def _on(flags: Mapping[str, Any], key: str) -> bool:
    value = flags.get(key)
    return value is True or str(value).lower() in ("true", "1", "yes")


def default_chunk(vram_gib: float) -> int:
    """SGLang's ``--chunked-prefill-size`` default by visible VRAM (facts §3)."""
    return 2048 if vram_gib < 35 else 4096 if vram_gib < 60 else 8192 if vram_gib < 160 else 16384


def default_graph_bs(vram_gib: float, tp: int) -> int:
    """SGLang's ``--cuda-graph-max-bs`` default by VRAM bucket and TP (facts §3)."""
    if vram_gib < 20:
        return 8
    if vram_gib < 35:
        return 24 if tp < 4 else 80
    if vram_gib < 60:
        return 32 if tp < 4 else 160
    return 256 if tp < 4 else 512


def auto_mem_fraction(vram_mib: float, chunk: int, graph_bs: int, tp: int) -> float:
    """SGLang's automatic ``--mem-fraction-static`` (reserve in MiB, >= 10 GiB on > 60 GiB cards)."""
    reserved = 512 + 1.5 * max(chunk, 2048) + 2 * graph_bs + 1024 * tp / 8
    if vram_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((vram_mib - reserved) / vram_mib, 3) if vram_mib > reserved else 0.0


def resolve_launch(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any],
                   workloads: Sequence[Workload] = ()) -> LaunchPlan:
    """Flags with SGLang's defaults for what is unset; ``max-total-tokens: auto`` is sized
    from the workloads by :func:`auto_max_total_tokens`."""
    tp = _num(flags, "tensor-parallel-size", None) or _num(flags, "tp-size", 1)
    if tp < 1:
        raise ConfigError(f"launch flag tensor-parallel-size must be >= 1; got {tp}")
    base = _num(flags, "base-gpu-id", 0)
    used = hw.gpus[base:base + tp]
    vram = min((g.total_bytes for g in used), default=0)
    ratio = _num(flags, "kt-gpu-experts-ratio", None, float)
    count = _num(flags, "kt-num-gpu-experts", None)
    kt = bool(_get(flags, "kt-weight-path")) and (ratio is not None or count is not None)
    n = max(int(ratio * model.n_routed_experts) if ratio is not None else (count or 0), 0)
    chunk = _num(flags, "chunked-prefill-size", default_chunk(vram / GIB))
    graph_bs = _num(flags, "cuda-graph-max-bs", default_graph_bs(vram / GIB, tp))
    mfs = _num(flags, "mem-fraction-static", None, float)
    if mfs is not None and not 0 < mfs <= 1:
        raise ConfigError(f"launch flag mem-fraction-static must be in (0, 1]; got {mfs}")
    method = str(_get(flags, "kt-method") or "AMXINT4").upper()
    model.cpu_bytes_per_expert(method)  # unknown method -> ConfigError
    kv_dtype = str(_get(flags, "kv-cache-dtype") or "auto").lower()
    plan = LaunchPlan(
        tp=tp, base_gpu=base, kt_enabled=kt, n_gpu_experts=n if kt else model.n_routed_experts, kt_method=method,
        cpuinfer=_num(flags, "kt-cpuinfer", None), threadpools=_num(flags, "kt-threadpool-count", 2),
        chunk=chunk, max_running=_num(flags, "max-running-requests", None), max_total_tokens=None,
        mfs=mfs if mfs is not None else auto_mem_fraction(vram / MIB, chunk, graph_bs, tp), mfs_auto=mfs is None,
        graph_max_bs=graph_bs, graphs=not _on(flags, "disable-cuda-graph"),
        context_len=_num(flags, "context-length", model.max_position_embeddings),
        page_size=max(_num(flags, "page-size", 1), 1), kv_dtype_bytes=1 if "fp8" in kv_dtype else model.dtype_bytes,
        layerwise_threshold=_num(flags, "kt-gpu-prefill-token-threshold", 0))
    t = _get(flags, "max-total-tokens")
    if str(t).lower() == "auto":
        t = auto_max_total_tokens(model, hw, flags, workloads)
    return replace(plan, max_total_tokens=None if t is None else _num({"max-total-tokens": t}, "max-total-tokens", None))


# --- memory ------------------------------------------------------------------------------------
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
class _Mem:
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


def _memory(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, max_input: int) -> _Mem:
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
    return _Mem(free=free, f0=f0, w_ne=w_ne + w_off, experts=experts, staging=staging, kv=float(tokens * cell),
                rtt=rtt, graphs=graphs, act=alpha * chunk, slot=slot,
                tokens=tokens, profiled=profiled, cell=cell, req_pool=req_pool, rest=rest, prof_cell=prof_cell,
                spread=spread, anchored=anchored)


def anchor_margin(cal: MemoryCalibration, spread: float) -> float:
    """Bytes an anchored prediction keeps free: a share of its difference from the reference,
    the launch-to-launch spread (standard deviation) of free memory, and what failures added."""
    df = max(cal.f0_n - 1, 0) + cal.f0_sd_prior_df
    sd = math.sqrt((cal.f0_m2 + cal.f0_sd_prior_df * cal.f0_sd_prior_gb ** 2) / df) if df > 0 else 0.0
    return cal.anchor_rel * spread + (cal.f0_sd_weight * sd + cal.anchor_extra_gb) * GB


def boundary_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """The anchored model trusted exactly in its differences from the reference launch, still
    keeping free memory's launch-to-launch spread and what failures taught: a configuration
    admitted by it is one whose launch tests the model, not one that fails every few starts.
    Until launches measure that spread, it is taken as BOUNDARY_F0_SD_PRIOR_GB (worth two
    launches), the scale of the fuzzy OOM band near the cliff (perf-model §3.7: ±0.4 GB).
    BOUNDARY_SD_WEIGHT standard deviations kept free: a fresh launch fits about 70 % of the time."""
    return replace(cal, anchor_rel=0.0, f0_sd_weight=BOUNDARY_SD_WEIGHT,
                   f0_sd_prior_gb=BOUNDARY_F0_SD_PRIOR_GB, f0_sd_prior_df=2.0)


def band_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """What a launch inside the margin may test: :func:`boundary_calibration` with activations at
    BOUNDARY_ACTIVATION_SHARE of their estimate (never below what a run-time OOM proved). No log
    line reports activations; only a run next to little free memory bounds them, so such runs
    are how an overestimate is found (a survival bounds α from above, an OOM from below)."""
    return replace(boundary_calibration(cal), activation_share=BOUNDARY_ACTIVATION_SHARE)


def _plain(cal: MemoryCalibration) -> MemoryCalibration:
    """The model without anything learned from launches (keeps the configured scales)."""
    return replace(cal, nonexpert_weight_gb=None, graph_bytes_per_batch=None, f0_gb=None, ref_tp=None,
                   act_upper_bytes_per_token=None, act_lower_bytes_per_token=None)


def _gpu_constraints(mem: _Mem, plan: LaunchPlan, margin_gb: float, max_req: int,
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
        out["kv_tokens_short"] = float(max_req - _tokens_with_less_free(mem, plan, less_free))
    return out


def _tokens_with_less_free(mem: _Mem, plan: LaunchPlan, less: float) -> int:
    """KV tokens the pool gets if free memory at start-up is ``less`` bytes below the prediction
    (the anchored margin: the uncertainty of free memory and of the model's differences): where
    the profile, not max-total-tokens, sizes the pool, that uncertainty shrinks it too."""
    rest = mem.rest - plan.mfs * less
    page = plan.page_size
    profiled = int(rest // mem.prof_cell) // page * page if rest > 0 else 0
    return profiled if plan.max_total_tokens is None else min(plan.max_total_tokens // page * page, profiled)


# --- report --------------------------------------------------------------------------------------
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


_SCALE_GB = ("gpu_mem_static_gb", "gpu_mem_startup_gb", "gpu_mem_runtime_gb")


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
    if "kv_tokens_short" in bad and any(k in bad for k in _SCALE_GB):
        del bad["kv_tokens_short"]
    return max(bad, key=lambda k: bad[k]) if bad else None


def check(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload], *,
          margin_gb: float = 2.0, calibration: MemoryCalibration | None = None) -> FeasibilityReport:
    """Predict whether ``flags`` (dashed CLI names, no leading dashes) fit; see module doc."""
    cal = calibration or MemoryCalibration()
    plan = resolve_launch(model, hw, flags, workloads)
    max_req = max((i + o for _, i, o in workloads), default=0)
    max_in = max((i for _, i, _ in workloads), default=0)
    mem = _memory(model, hw, plan, cal, max_in)
    cpu = hw.cpu
    cons: dict[str, float] = {"tp_over_gpus": float(plan.tp - len(hw.gpus[plan.base_gpu:]))}
    heads_rem = model.num_attention_heads % plan.tp
    if model.attention == "gqa" and model.num_kv_heads % plan.tp and plan.tp % model.num_kv_heads:
        heads_rem = max(heads_rem, model.num_kv_heads % plan.tp)
    cons["tp_divides_heads"] = float(heads_rem)
    cons.update(_gpu_constraints(mem, plan, margin_gb, max_req, cal))
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
    scales = {**dict.fromkeys(_SCALE_GB, max(mem.f0 / GB, 1.0)), "kv_tokens_short": max(max_req, 1),
              "context_len_short": max(max_req, 1), "cpuinfer_over_cores": cpu.physical_cores}
    binding = _binding(cons, scales)
    bare_slack = band_slack = marginal = activation_test = None
    if mem.anchored:  # observed + difference, without the margin for the model's difference
        bare = _gpu_constraints(mem, plan, 0.0, max_req, boundary_calibration(cal))
        bare_slack = -max(bare[k] for k in _SCALE_GB)
        band_cal = band_calibration(cal)
        band = _gpu_constraints(_memory(model, hw, plan, band_cal, max_in), plan, 0.0, max_req, band_cal)
        band_slack = -max(band[k] for k in _SCALE_GB)
        others_hold = binding in _SCALE_GB and all(v <= 0 for k, v in cons.items() if k not in bare)
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


def _warnings(model: ModelSizes, hw: Hardware, plan: LaunchPlan, mem: _Mem, soft: Mapping[str, float],
              flags: Mapping[str, Any]) -> list[str]:
    w: list[str] = []
    cpu = hw.cpu
    if not plan.kt_enabled:
        w.append("KT is off (needs kt-weight-path plus kt-num-gpu-experts or kt-gpu-experts-ratio): "
                 "all routed experts load on the GPUs")
    else:
        if (_num(flags, "kt-num-gpu-experts", 0) or 0) > model.n_routed_experts:
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
    if _on(flags, "enable-dp-attention"):
        w.append("enable-dp-attention is not modelled; memory figures assume plain TP")
    return w


def _fits(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, margin_gb: float,
          max_req: int, max_in: int) -> bool:
    mem = _memory(model, hw, plan, cal, max_in)
    return all(v <= 0 for v in _gpu_constraints(mem, plan, margin_gb, max_req, cal).values())


def _largest_n(model: ModelSizes, hw: Hardware, plan: LaunchPlan, cal: MemoryCalibration, margin_gb: float,
               max_req: int, max_in: int) -> int | None:
    for n in range(model.n_routed_experts, -1, -1):  # memory need is not monotone in N when KV is profiled
        if _fits(model, hw, replace(plan, kt_enabled=True, n_gpu_experts=n), cal, margin_gb, max_req, max_in):
            return n
    return None


def _hints(model: ModelSizes, hw: Hardware, plan: LaunchPlan, mem: _Mem, cons: Mapping[str, float],
           cal: MemoryCalibration, margin: float, max_req: int, max_in: int) -> dict[str, str]:
    h: dict[str, str] = {}
    cpu = hw.cpu
    gpu_bad = [k for k in (*_SCALE_GB, "kv_tokens_short") if cons.get(k, 0) > 0]
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


# --- helpers for the study -----------------------------------------------------------------------
def auto_max_total_tokens(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload],
                          *, headroom: float = 1.1) -> int:
    """KV tokens the workloads need: R × max(in + out) × headroom (R capped by the prompt count),
    rounded up to the page size, never below the largest request."""
    if not workloads:
        raise ConfigError("max-total-tokens: auto needs at least one workload")
    need = max(i + o for _, i, o in workloads)
    prompts = max(n for n, _, _ in workloads)
    r = min(_num(flags, "max-running-requests", None) or prompts, prompts)
    page = max(_num(flags, "page-size", 1), 1)
    tokens = max(math.ceil(round(r * need * headroom, 6)), need)
    return -(-tokens // page) * page


def max_gpu_experts(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload], *,
                    margin_gb: float = 2.0, calibration: MemoryCalibration | None = None) -> int:
    """Largest kt-num-gpu-experts whose GPU memory and KV constraints hold with the other flags
    as given (KT assumed on); 0 when none does."""
    plan = resolve_launch(model, hw, flags, workloads)
    max_req = max((i + o for _, i, o in workloads), default=0)
    max_in = max((i for _, i, _ in workloads), default=0)
    n = _largest_n(model, hw, plan, calibration or MemoryCalibration(), margin_gb, max_req, max_in)
    return n or 0


_GIB_GB = GIB / GB
# calibrate_from_log's keys and the worst_memory_figures keys they come from, in output order.
_FROM_LOG = (("avail_before_weights_gb", "weight_begin_avail_gib"), ("weights_gb", "weight_mem_gib"),
             ("avail_after_weights_gb", "weight_avail_gib"), ("kv_tokens", "kv_tokens"),
             ("cuda_graph_gb", "cuda_graph_mem_gib"), ("available_gpu_mem_gb", "available_gpu_mem_gib"),
             ("max_total_num_tokens", "max_total_num_tokens"), ("chunked_prefill_size", "chunked_prefill_size"),
             ("max_running_requests", "max_running_requests"), ("context_len", "context_len"),
             ("kt_gpu_experts_per_layer", "kt_gpu_experts_per_layer"), ("kt_total_gpu_experts", "kt_total_gpu_experts"))


def calibrate_from_log(log_text: str) -> dict[str, Any]:
    """Numbers an sglang-kt server log reports about memory (:func:`tuner.server.worst_memory_figures`),
    converted to decimal GB (the log prints GiB as "GB"); only the keys found are returned. Over
    TP ranks: the worst rank."""
    logged = worst_memory_figures(log_text)
    out: dict[str, Any] = {}
    for key, source in _FROM_LOG:
        if source in logged:
            out[key] = round(logged[source] * _GIB_GB, 4) if key.endswith("_gb") else logged[source]
    if "kv_size_gib" in logged:
        out["kv_size_gb"] = round(logged["kv_size_gib"] * _GIB_GB, 4)
        if out.get("kv_tokens"):
            out["kv_bytes_per_token"] = round(out["kv_size_gb"] * GB / out["kv_tokens"], 1)
    if "kv_clip_requested_tokens" in logged:
        out["max_total_tokens_requested"] = logged["kv_clip_requested_tokens"]
        out["max_total_tokens_profiled"] = logged["kv_clip_profiled_tokens"]
    out["oom"] = logged["cuda_oom"]
    out["not_enough_memory"] = logged["kv_not_enough_memory"]
    return out


def calibration_from_observed(observed: Mapping[str, Any], model: ModelSizes, hw: Hardware,
                              flags: Mapping[str, Any], *, base: MemoryCalibration | None = None) -> MemoryCalibration:
    """Fold logged weights and graph memory (:func:`calibrate_from_log`) into a calibration."""
    cal = base or MemoryCalibration()
    plan = resolve_launch(model, hw, flags)
    mem = _memory(model, hw, plan, cal, 0)
    if "weights_gb" in observed:
        cal = replace(cal, nonexpert_weight_gb=max(observed["weights_gb"] - (mem.experts + mem.staging) / GB, 0.0))
    bs = min(plan.graph_max_bs, mem.req_pool) if plan.graphs else 0
    if "cuda_graph_gb" in observed and bs:
        cal = replace(cal, graph_bytes_per_batch=max(observed["cuda_graph_gb"] - cal.runtime_base_gb, 0.0) * GB / bs)
    return cal


def anchor_from_observed(observed: Mapping[str, Any], model: ModelSizes, hw: Hardware, flags: Mapping[str, Any],
                         *, base: MemoryCalibration | None = None, full_chunk_tokens: int = 0,
                         runtime_oom: bool = False) -> MemoryCalibration:
    """Anchor the memory model on one launch's log (:func:`calibrate_from_log`).

    The reference's weights, graph memory and free memory become observed values; later
    predictions at that TP are observed + model(new) − model(reference), so the model's errors
    in fixed costs cancel. Activations are bounded from the run: ``full_chunk_tokens`` > 0 means
    a forward of that many tokens survived next to ``available_gpu_mem`` (α at most
    (available − slot)/tokens); ``runtime_oom`` means it did not (α above that)."""
    cal = base or MemoryCalibration()
    if "weights_gb" not in observed or "avail_after_weights_gb" not in observed:
        return cal
    plan = resolve_launch(model, hw, flags)
    ref = _memory(model, hw, plan, _plain(cal), 0)
    f0 = observed["weights_gb"] + observed["avail_after_weights_gb"]
    if "avail_before_weights_gb" in observed:
        f0 = min(f0, observed["avail_before_weights_gb"])
    same_tp = cal.ref_tp == plan.tp and cal.f0_gb is not None
    if same_tp:
        n, mean = cal.f0_n + 1, cal.f0_gb + (f0 - cal.f0_gb) / (cal.f0_n + 1)  # type: ignore[operator]
        m2 = cal.f0_m2 + (f0 - cal.f0_gb) * (f0 - mean)  # type: ignore[operator]
    else:
        n, mean, m2 = 1, f0, 0.0
    if "available_gpu_mem_gb" not in observed:  # start-up failed: only a full start-up is a reference
        return replace(cal, f0_gb=mean, f0_n=n, f0_m2=m2) if same_tp else cal
    out = replace(cal, ref_tp=plan.tp, f0_gb=mean, f0_n=n, f0_m2=m2,
                  weights_offset_gb=observed["weights_gb"] - ref.weights / GB,
                  ref_weights_gb=ref.weights / GB, ref_kv_gb=observed.get("kv_size_gb", ref.kv / GB), ref_rtt_gb=ref.rtt / GB,
                  ref_graphs_gb=ref.graphs / GB, ref_chunk=plan.chunk, nonexpert_weight_gb=None,
                  graph_bytes_per_batch=None)
    if not same_tp:
        out = replace(out, anchor_extra_gb=0.0, act_upper_bytes_per_token=None, act_lower_bytes_per_token=None,
                      graph_slope_bytes=None, graph_ref_bs=0)
    bs = min(plan.graph_max_bs, ref.req_pool) if plan.graphs else 0
    if "cuda_graph_gb" in observed and bs:
        obs = observed["cuda_graph_gb"]
        if same_tp and cal.graph_ref_bs and abs(bs - cal.graph_ref_bs) >= 8:
            prev = cal.ref_graphs_gb + cal.graphs_offset_gb
            out = replace(out, graph_slope_bytes=max((obs - prev) * GB / (bs - cal.graph_ref_bs), 0.0))
        out = replace(out, graphs_offset_gb=obs - ref.graphs / GB, graph_ref_bs=bs)
    avail = observed.get("available_gpu_mem_gb")
    if avail is not None and full_chunk_tokens > 0:
        bound = max(avail * GB - ref.slot, 0.0) / full_chunk_tokens
        if runtime_oom:
            low = out.act_lower_bytes_per_token
            out = replace(out, act_lower_bytes_per_token=bound if low is None else max(low, bound))
        else:
            up = out.act_upper_bytes_per_token
            out = replace(out, act_upper_bytes_per_token=bound if up is None else min(up, bound))
    return out
