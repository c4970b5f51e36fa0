"""The launch as sglang will run it: :class:`LaunchPlan` (flags with sglang's defaults applied,
after ``ServerArgs._handle_gpu_memory_settings`` in sglang's python/sglang/srt/server_args.py),
``max-total-tokens: auto``, and the unit and workload shape the feasibility modules share."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tuner.errors import ConfigError
from tuner.machine import GIB, MIB, Hardware, ModelSizes

GB = 1e9  # the model's sizes are decimal GB; sglang's logs print GiB as "GB"
Workload = tuple[int, int, int]  # (num_prompts, input_len, output_len)


@dataclass(frozen=True)
class LaunchPlan:
    """Launch flags with SGLang's defaults applied for what is unset."""

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


def flag_value(flags: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` set (not None) in ``flags``, else None."""
    for k in keys:
        if flags.get(k) is not None:
            return flags[k]
    return None


def flag_number(flags: Mapping[str, Any], key: str, default: Any, kind: type = int) -> Any:
    """Flag ``key`` as ``kind`` (int: a whole number, "4096.0" allowed), ``default`` when unset;
    ConfigError for anything else."""
    value = flag_value(flags, key)
    if value is None:
        return default
    try:
        out = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"launch flag {key} must be a number; got {value!r}") from None
    if kind is int and float(value) != out:
        raise ConfigError(f"launch flag {key} must be a whole number; got {value!r}")
    return out


def flag_on(flags: Mapping[str, Any], key: str) -> bool:
    """Whether a store-true flag is set (True, or "true", "1", "yes")."""
    value = flags.get(key)
    return value is True or str(value).lower() in ("true", "1", "yes")


def default_chunk(vram_gib: float) -> int:
    """SGLang's ``--chunked-prefill-size`` default by visible VRAM (GiB)."""
    return 2048 if vram_gib < 35 else 4096 if vram_gib < 60 else 8192 if vram_gib < 160 else 16384


def default_graph_bs(vram_gib: float, tp: int) -> int:
    """SGLang's ``--cuda-graph-max-bs`` default by VRAM bucket (GiB) and TP."""
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
    tp = flag_number(flags, "tensor-parallel-size", None) or flag_number(flags, "tp-size", 1)
    if tp < 1:
        raise ConfigError(f"launch flag tensor-parallel-size must be >= 1; got {tp}")
    base = flag_number(flags, "base-gpu-id", 0)
    used = hw.gpus[base:base + tp]
    vram = min((g.total_bytes for g in used), default=0)
    ratio = flag_number(flags, "kt-gpu-experts-ratio", None, float)
    count = flag_number(flags, "kt-num-gpu-experts", None)
    # KT offloads experts only with a weight path and a GPU-expert count or ratio; else all load on the GPUs.
    kt = bool(flag_value(flags, "kt-weight-path")) and (ratio is not None or count is not None)
    experts = max(int(ratio * model.n_routed_experts) if ratio is not None else (count or 0), 0)
    chunk = flag_number(flags, "chunked-prefill-size", default_chunk(vram / GIB))
    graph_bs = flag_number(flags, "cuda-graph-max-bs", default_graph_bs(vram / GIB, tp))
    mfs = flag_number(flags, "mem-fraction-static", None, float)
    if mfs is not None and not 0 < mfs <= 1:
        raise ConfigError(f"launch flag mem-fraction-static must be in (0, 1]; got {mfs}")
    method = str(flag_value(flags, "kt-method") or "AMXINT4").upper()
    model.cpu_bytes_per_expert(method)  # unknown method -> ConfigError
    kv_dtype = str(flag_value(flags, "kv-cache-dtype") or "auto").lower()
    plan = LaunchPlan(
        tp=tp, base_gpu=base, kt_enabled=kt, n_gpu_experts=experts if kt else model.n_routed_experts, kt_method=method,
        cpuinfer=flag_number(flags, "kt-cpuinfer", None), threadpools=flag_number(flags, "kt-threadpool-count", 2),
        chunk=chunk, max_running=flag_number(flags, "max-running-requests", None), max_total_tokens=None,
        mfs=mfs if mfs is not None else auto_mem_fraction(vram / MIB, chunk, graph_bs, tp), mfs_auto=mfs is None,
        graph_max_bs=graph_bs, graphs=not flag_on(flags, "disable-cuda-graph"),
        context_len=flag_number(flags, "context-length", model.max_position_embeddings),
        page_size=max(flag_number(flags, "page-size", 1), 1), kv_dtype_bytes=1 if "fp8" in kv_dtype else model.dtype_bytes,
        layerwise_threshold=flag_number(flags, "kt-gpu-prefill-token-threshold", 0))
    total_tokens = flag_value(flags, "max-total-tokens")
    if str(total_tokens).lower() == "auto":
        total_tokens = auto_max_total_tokens(model, hw, flags, workloads)
    return replace(plan, max_total_tokens=None if total_tokens is None
                   else flag_number({"max-total-tokens": total_tokens}, "max-total-tokens", None))


def auto_max_total_tokens(model: ModelSizes, hw: Hardware, flags: Mapping[str, Any], workloads: Sequence[Workload],
                          *, headroom: float = 1.1) -> int:
    """KV tokens the workloads need: R × max(in + out) × headroom (R capped by the prompt count),
    rounded up to the page size, never below the largest request."""
    if not workloads:
        raise ConfigError("max-total-tokens: auto needs at least one workload")
    need = max(i + o for _, i, o in workloads)
    prompts = max(n for n, _, _ in workloads)
    running = min(flag_number(flags, "max-running-requests", None) or prompts, prompts)
    page = max(flag_number(flags, "page-size", 1), 1)
    tokens = max(math.ceil(round(running * need * headroom, 6)), need)
    return -(-tokens // page) * page
