"""The launch flags the performance model understands (`SimConfig`) and the configuration
they resolve to once SGLang's defaults and KTransformers' expert placement apply."""
from __future__ import annotations

from dataclasses import dataclass

from tuner.sim.scenario import Scenario

MAX_PREFILL_TOKENS = 16384
#: kt-methods that can stream their weights to the GPU for layerwise prefill (facts §2).
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


def _bucket(v_gib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) defaults by visible VRAM (facts §3)."""
    chunk = 2048 if v_gib < 35 else 4096 if v_gib < 60 else 8192 if v_gib < 160 else 16384
    small = tp < 4
    bs = 8 if v_gib < 20 else (24 if small else 80) if v_gib < 35 else \
        (32 if small else 160) if v_gib < 60 else (256 if small else 512)
    return chunk, bs


def resolve(scn: Scenario, cfg: SimConfig) -> ResolvedConfig:
    m, notes = scn.model, []
    chunk_default, bs_default = _bucket(scn.gpu.visible_memory_gib, cfg.tp)
    chunk = chunk_default if cfg.chunked_prefill_size is None else cfg.chunked_prefill_size
    reserve_chunk = max(chunk, 2048)
    if chunk <= 0 and cfg.kt_weight_path is None:
        chunk = max(MAX_PREFILL_TOKENS, m.context_len)   # chunking disabled
    kt_on = cfg.kt_weight_path is not None
    if kt_on and cfg.kt_num_gpu_experts is None and cfg.kt_gpu_experts_ratio is None:
        notes.append("Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.")
        kt_on = False
    if not kt_on:
        n, total = float(m.experts), m.experts * m.layers_moe
    elif cfg.kt_gpu_experts_ratio is not None:
        total = int(m.experts * m.layers_moe * min(1.0, max(0.0, cfg.kt_gpu_experts_ratio)))
        n = total / m.layers_moe
    else:
        n = float(min(m.experts, max(0, cfg.kt_num_gpu_experts or 0)))
        total = int(n) * m.layers_moe
    if kt_on:
        notes.append(f"Using kt_num_gpu_experts={round(n)} per layer, total GPU experts: {total}")
    bs = cfg.cuda_graph_max_bs if cfg.cuda_graph_max_bs is not None else bs_default
    mfs = cfg.mem_fraction_static
    if mfs is None:   # SGLang auto: (VRAM - reserve) / VRAM
        v_mib = scn.gpu.visible_memory_gib * 1024
        reserve = 512 + 1.5 * reserve_chunk + 2 * bs + 1024 * cfg.tp / 8
        if scn.gpu.visible_memory_gib > 60:
            reserve = max(reserve, 10 * 1024)
        mfs = round((v_mib - reserve) / v_mib, 3)
    method = (cfg.kt_method or "AMXINT4").upper()
    thr = cfg.kt_gpu_prefill_token_threshold or 0
    if kt_on and thr > 0 and method not in NATIVE_KT_METHODS:
        notes.append(f"kt_gpu_prefill_token_threshold={thr} ignored: kt_method {method} is not native")
        thr = 0
    return ResolvedConfig(
        tp=cfg.tp, kt_on=kt_on, gpu_experts=n, total_gpu_experts=total,
        cpuinfer=cfg.kt_cpuinfer or 0, method=method,
        threadpool=2 if cfg.kt_threadpool_count is None else cfg.kt_threadpool_count,
        deferral=max(0, cfg.kt_max_deferred_experts_per_token or 0) if kt_on else 0,
        layerwise_threshold=thr if (kt_on and 0 < thr <= chunk) else 0,
        chunk=chunk, chunk_flag=cfg.chunked_prefill_size, max_running=cfg.max_running_requests,
        max_total_tokens=cfg.max_total_tokens, mfs=mfs,
        graph_max_bs=0 if cfg.disable_cuda_graph else bs, mixed_chunk=cfg.enable_mixed_chunk,
        context_len=cfg.context_length or m.context_len, notes=tuple(notes))

