"""The launch flags the performance model understands (`SimConfig`) and the configuration
they resolve to once SGLang's defaults and KTransformers' expert placement apply."""
from __future__ import annotations

from dataclasses import dataclass

from tuner.sim.perfmodel.placement import (
    FALLBACK_WARNING,
    Component,
    DumpError,
    Routing,
    flat,
    from_counts,
    read_dump,
    top,
    zipf,
)
from tuner.sim.scenario import Scenario

MAX_PREFILL_TOKENS = 16384
#: kt-methods whose weights can also be streamed to the GPU for layerwise prefill; with any other
#: method kt-gpu-prefill-token-threshold is ignored.
NATIVE_KT_METHODS = frozenset({"RAWINT4", "FP8", "FP8_PERCHANNEL", "BF16", "MXFP4", "GPTQ_INT4"})


@dataclass(frozen=True)
class SimConfig:
    """The launch_server flags the simulator understands (None = flag absent)."""

    tp: int = 1
    kt_weight_path: str | None = None
    kt_num_gpu_experts: int | None = None
    kt_gpu_experts_ratio: float | None = None
    kt_cpuinfer: int | None = None
    kt_threadpool_count: int = 2
    kt_method: str = "AMXINT4"
    kt_max_deferred_experts_per_token: int = 0
    kt_gpu_prefill_token_threshold: int = 0
    chunked_prefill_size: int | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    cuda_graph_max_bs: int | None = None
    enable_mixed_chunk: bool = False
    disable_cuda_graph: bool = False
    context_length: int | None = None
    kt_expert_placement_strategy: str = "uniform"
    init_expert_location: str = "trivial"
    kt_enable_dynamic_expert_update: bool = False
    # KT_RAWINT4_BACKEND (an environment variable of the server, not a flag); None = unset
    rawint4_backend: str | None = None

    def resolved(self, scn: Scenario) -> ResolvedConfig:
        return resolve(scn, self)


@dataclass(frozen=True)
class ResolvedConfig:
    """SimConfig after SGLang's defaults and KT's placement rules."""

    tp: int
    kt_on: bool
    gpu_experts: float            # per MoE layer (mean when set by ratio)
    total_gpu_experts: int
    cpuinfer: int
    threadpool: int
    method: str
    deferral: int
    layerwise_threshold: int      # 0: layerwise GPU prefill off
    chunk: int
    chunk_flag: int | None
    max_running: int | None       # None: derived from KV capacity at startup
    max_total_tokens: int | None
    mfs: float
    graph_max_bs: int             # configured --cuda-graph-max-bs (0 when graphs are disabled)
    mixed_chunk: bool
    context_len: int
    notes: tuple[str, ...] = ()
    # Where routed tokens go under the placement; None = uniform routing (the uniform formula).
    routing: Routing | None = None
    # The same with the GPU experts re-picked by dynamic expert update (None: no update).
    updated_routing: Routing | None = None
    cpu_backend: str | None = None    # KT_RAWINT4_BACKEND where it applies
    placement_error: str | None = None  # the --init-expert-location file cannot be used


def _vram_defaults(visible_gib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) defaults by visible VRAM, bucketed the way SGLang's
    python/sglang/srt/server_args.py picks them from the GPU memory (a smaller graph batch below TP4)."""
    chunk = 2048 if visible_gib < 35 else 4096 if visible_gib < 60 else 8192 if visible_gib < 160 else 16384
    small_tp = tp < 4
    graph_bs = 8 if visible_gib < 20 else (24 if small_tp else 80) if visible_gib < 35 else \
        (32 if small_tp else 160) if visible_gib < 60 else (256 if small_tp else 512)
    return chunk, graph_bs


def resolve(scn: Scenario, cfg: SimConfig) -> ResolvedConfig:
    model, notes = scn.model, []
    chunk_default, graph_bs_default = _vram_defaults(scn.gpu.visible_memory_gib, cfg.tp)
    chunk = chunk_default if cfg.chunked_prefill_size is None else cfg.chunked_prefill_size
    reserve_chunk = max(chunk, 2048)
    if chunk <= 0 and cfg.kt_weight_path is None:
        chunk = max(MAX_PREFILL_TOKENS, model.context_len)   # chunking disabled
    kt_on = cfg.kt_weight_path is not None
    if kt_on and cfg.kt_num_gpu_experts is None and cfg.kt_gpu_experts_ratio is None:
        notes.append("Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.")
        kt_on = False
    if not kt_on:
        gpu_experts_per_layer, total_gpu_experts = float(model.experts), model.experts * model.layers_moe
    elif cfg.kt_gpu_experts_ratio is not None:
        total_gpu_experts = int(model.experts * model.layers_moe * min(1.0, max(0.0, cfg.kt_gpu_experts_ratio)))
        gpu_experts_per_layer = total_gpu_experts / model.layers_moe
    else:
        gpu_experts_per_layer = float(min(model.experts, max(0, cfg.kt_num_gpu_experts or 0)))
        total_gpu_experts = int(gpu_experts_per_layer) * model.layers_moe
    if kt_on:
        notes.append(f"Using kt_num_gpu_experts={round(gpu_experts_per_layer)} per layer, "
                     f"total GPU experts: {total_gpu_experts}")
    graph_max_bs = cfg.cuda_graph_max_bs if cfg.cuda_graph_max_bs is not None else graph_bs_default
    mem_fraction = cfg.mem_fraction_static
    if mem_fraction is None:   # SGLang auto: (VRAM - reserve) / VRAM
        visible_mib = scn.gpu.visible_memory_gib * 1024
        reserve_mib = 512 + 1.5 * reserve_chunk + 2 * graph_max_bs + 1024 * cfg.tp / 8
        if scn.gpu.visible_memory_gib > 60:
            reserve_mib = max(reserve_mib, 10 * 1024)
        mem_fraction = round((visible_mib - reserve_mib) / visible_mib, 3)
    method = (cfg.kt_method or "AMXINT4").upper()
    layerwise_threshold = cfg.kt_gpu_prefill_token_threshold or 0
    if kt_on and layerwise_threshold > 0 and method not in NATIVE_KT_METHODS:
        notes.append(f"kt_gpu_prefill_token_threshold={layerwise_threshold} ignored: kt_method {method} is not native")
        layerwise_threshold = 0
    routing, updated, placement_error = _routing(scn, cfg, kt_on, gpu_experts_per_layer, notes)
    if not (kt_on and cfg.kt_enable_dynamic_expert_update and 0 < layerwise_threshold <= chunk):
        updated = None
    backend = cfg.rawint4_backend.lower() if (kt_on and method == "RAWINT4" and cfg.rawint4_backend) else None
    return ResolvedConfig(
        tp=cfg.tp, kt_on=kt_on, gpu_experts=gpu_experts_per_layer, total_gpu_experts=total_gpu_experts,
        cpuinfer=cfg.kt_cpuinfer or 0, method=method,
        threadpool=2 if cfg.kt_threadpool_count is None else cfg.kt_threadpool_count,
        deferral=max(0, cfg.kt_max_deferred_experts_per_token or 0) if kt_on else 0,
        layerwise_threshold=layerwise_threshold if (kt_on and 0 < layerwise_threshold <= chunk) else 0,
        chunk=chunk, chunk_flag=cfg.chunked_prefill_size, max_running=cfg.max_running_requests,
        max_total_tokens=cfg.max_total_tokens, mfs=mem_fraction,
        graph_max_bs=0 if cfg.disable_cuda_graph else graph_max_bs, mixed_chunk=cfg.enable_mixed_chunk,
        context_len=cfg.context_length or model.context_len, notes=tuple(notes),
        routing=routing, updated_routing=updated, cpu_backend=backend, placement_error=placement_error)


def _routing(scn: Scenario, cfg: SimConfig, kt_on: bool, gpu_experts: float, notes: list[str]
             ) -> tuple[Routing | None, Routing | None, str | None]:
    """(routing under the placement, routing once dynamic update has re-picked the GPU experts,
    the error of an unusable --init-expert-location). Uniform routing (expert_zipf_s 0) keeps
    the uniform formula: (None, None, ...)."""
    model, s = scn.model, scn.c("expert_zipf_s")
    strategy = cfg.kt_expert_placement_strategy
    cpu: tuple[float, ...] | None = None
    error = None
    if kt_on and strategy == "frequency":
        location = cfg.init_expert_location
        if location and location.endswith(".pt"):
            notes.append(f"Loading activation frequency from {location}")
            try:
                counts = read_dump(location, model.layers_total, model.experts)
                moe_layers = list(range(model.layers_total - model.layers_moe, model.layers_total))
                cpu = from_counts(counts, moe_layers, scn.name, model.experts, gpu_experts)
                notes.append("Using frequency-based strategy with activation frequency data")
            except DumpError as exc:
                error = str(exc)
        else:
            notes.append(FALLBACK_WARNING)
    elif kt_on:
        notes.append(f"Using {strategy} strategy for GPU expert placement")
    if not kt_on or s <= 0:
        return None, None, error
    q = zipf(model.experts, s)
    base = Component(1.0, q, cpu if cpu is not None else flat(model.experts, gpu_experts))
    locality = scn.c("routing_locality")
    local = Component(locality, zipf(model.experts, scn.c("expert_local_zipf_s")), top(model.experts, gpu_experts))
    # After an update the GPU holds the batch's hot experts: the local part of the routing hits
    # them, the rest sees the batch's top experts of the average popularity.
    updated = Routing((Component(1.0 - locality, q, top(model.experts, gpu_experts)), local), model.top_k)
    return Routing((base,), model.top_k), updated, error

