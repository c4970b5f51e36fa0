"""Learning from a launched server: its memory figures in decimal GB (:func:`calibrate_from_log`:
the server-info read-back first, the log as parsed by :mod:`tuner.server.logscan` for the rest),
and the calibration they
give, either corrected overheads (:func:`calibration_from_observed`) or an anchor on that launch
(:func:`anchor_from_observed`)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tuner.feasibility.calibration import MemoryCalibration, unlearned_calibration
from tuner.feasibility.memory import GpuMemory, gpu_memory
from tuner.feasibility.plan import GB, resolve_launch
from tuner.machine import GIB, Hardware, ModelSizes
from tuner.server import worst_memory_figures

_GIB_GB = GIB / GB  # sglang prints GiB as "GB"
# calibrate_from_log's keys and the worst_memory_figures keys they come from, in output order.
_FROM_LOG = (("avail_before_weights_gb", "weight_begin_avail_gib"), ("weights_gb", "weight_mem_gib"),
             ("avail_after_weights_gb", "weight_avail_gib"), ("kv_tokens", "kv_tokens"),
             ("cuda_graph_gb", "cuda_graph_mem_gib"), ("available_gpu_mem_gb", "available_gpu_mem_gib"),
             ("max_total_num_tokens", "max_total_num_tokens"), ("chunked_prefill_size", "chunked_prefill_size"),
             ("max_running_requests", "max_running_requests"), ("context_len", "context_len"),
             ("kt_gpu_experts_per_layer", "kt_gpu_experts_per_layer"), ("kt_total_gpu_experts", "kt_total_gpu_experts"))


_READ_BACK_KEYS = frozenset(source for _, source in _FROM_LOG) | {"kv_size_gib"}


def calibrate_from_log(log_text: str, read_back: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Numbers a server reports about memory, sizes converted to decimal GB and rounded to 4
    places; only the keys found are returned, plus ``oom`` and ``not_enough_memory``. Over TP
    ranks: the worst rank. ``read_back``: what the server-info endpoint reported
    (:func:`tuner.server.memory_from_server_info`), which wins over the log's figure of the same
    name; the log (:func:`tuner.server.worst_memory_figures`) gives the rest."""
    logged = worst_memory_figures(log_text)
    logged.update({k: v for k, v in (read_back or {}).items() if k in _READ_BACK_KEYS})
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
    mem = gpu_memory(model, hw, plan, cal, 0)
    if "weights_gb" in observed:
        cal = replace(cal, nonexpert_weight_gb=max(observed["weights_gb"] - (mem.gpu_experts + mem.staging) / GB, 0.0))
    graph_bs = min(plan.graph_max_bs, mem.request_slots) if plan.graphs else 0
    if "cuda_graph_gb" in observed and graph_bs:
        graph_gb = max(observed["cuda_graph_gb"] - cal.runtime_base_gb, 0.0)
        cal = replace(cal, graph_bytes_per_batch=graph_gb * GB / graph_bs)
    return cal


def anchor_from_observed(observed: Mapping[str, Any], model: ModelSizes, hw: Hardware, flags: Mapping[str, Any],
                         *, base: MemoryCalibration | None = None, full_chunk_tokens: int = 0,
                         runtime_oom: bool = False) -> MemoryCalibration:
    """Anchor the memory model on one launch's log (:func:`calibrate_from_log`).

    The reference's weights, graph memory and free memory become observed values; later
    predictions at that TP are observed + model(new) − model(reference), so the model's errors
    in fixed costs cancel. Activations are bounded from the run: ``full_chunk_tokens`` > 0 means
    a forward of that many tokens survived next to ``available_gpu_mem`` (activation bytes per
    token at most (available − layerwise slot) / tokens); ``runtime_oom`` means it did not
    (above that)."""
    cal = base or MemoryCalibration()
    if "weights_gb" not in observed:
        return cal
    plan = resolve_launch(model, hw, flags)
    ref = gpu_memory(model, hw, plan, unlearned_calibration(cal), 0)
    observed = with_free_after_weights(observed, ref, graphs=plan.graphs)
    if "avail_after_weights_gb" not in observed:
        return cal
    free_before = observed["weights_gb"] + observed["avail_after_weights_gb"]
    if "avail_before_weights_gb" in observed:
        free_before = min(free_before, observed["avail_before_weights_gb"])
    previous = cal.free_before_weights_gb if cal.reference_tp == plan.tp else None
    same_tp = previous is not None
    if previous is not None:  # Welford's update of the mean and the sum of squared deviations
        launches = cal.free_before_weights_launches + 1
        mean = previous + (free_before - previous) / (cal.free_before_weights_launches + 1)
        sum_sq_dev = cal.free_before_weights_sum_sq_dev + (free_before - previous) * (free_before - mean)
    else:
        launches, mean, sum_sq_dev = 1, free_before, 0.0
    if "available_gpu_mem_gb" not in observed:  # start-up failed: only a full start-up is a reference
        return replace(cal, free_before_weights_gb=mean, free_before_weights_launches=launches,
                       free_before_weights_sum_sq_dev=sum_sq_dev) if same_tp else cal
    out = replace(cal, reference_tp=plan.tp, free_before_weights_gb=mean, free_before_weights_launches=launches,
                  free_before_weights_sum_sq_dev=sum_sq_dev,
                  weights_offset_gb=observed["weights_gb"] - ref.weights / GB,
                  reference_weights_gb=ref.weights / GB, reference_kv_gb=observed.get("kv_size_gb", ref.kv_pool / GB),
                  reference_req_to_token_gb=ref.req_to_token_pool / GB, reference_graphs_gb=ref.cuda_graphs / GB,
                  reference_chunk=plan.chunk, nonexpert_weight_gb=None, graph_bytes_per_batch=None)
    if not same_tp:
        out = replace(out, anchor_extra_gb=0.0, activation_upper_bytes_per_token=None,
                      activation_lower_bytes_per_token=None, graph_slope_bytes=None, reference_graph_bs=0)
    graph_bs = min(plan.graph_max_bs, ref.request_slots) if plan.graphs else 0
    if "cuda_graph_gb" in observed and graph_bs:
        logged_graphs = observed["cuda_graph_gb"]
        if same_tp and cal.reference_graph_bs and abs(graph_bs - cal.reference_graph_bs) >= 8:
            previous_graphs = cal.reference_graphs_gb + cal.graphs_offset_gb
            out = replace(out, graph_slope_bytes=max((logged_graphs - previous_graphs) * GB
                                                     / (graph_bs - cal.reference_graph_bs), 0.0))
        out = replace(out, graphs_offset_gb=logged_graphs - ref.cuda_graphs / GB, reference_graph_bs=graph_bs)
    avail = observed.get("available_gpu_mem_gb")
    if avail is not None and full_chunk_tokens > 0:
        bound = max(avail * GB - ref.layerwise_slot, 0.0) / full_chunk_tokens
        if runtime_oom:
            low = out.activation_lower_bytes_per_token
            out = replace(out, activation_lower_bytes_per_token=bound if low is None else max(low, bound))
        else:
            up = out.activation_upper_bytes_per_token
            out = replace(out, activation_upper_bytes_per_token=bound if up is None else min(up, bound))
    return out


def with_free_after_weights(observed: Mapping[str, Any], ref: GpuMemory, *, graphs: bool) -> Mapping[str, Any]:
    """``observed`` with ``avail_after_weights_gb`` rebuilt where only the server-info read-back
    reported: upstream's ``startup_available`` is what start-up left free after the KV pool,
    the req-to-token pool and the graphs were allocated (in that order, after the weights), so
    free memory after the weights is their sum. The req-to-token pool is not reported; the
    model's size for it is exact (requests x (context + 4) int32 slots)."""
    if "avail_after_weights_gb" in observed or "available_gpu_mem_gb" not in observed or "kv_size_gb" not in observed:
        return observed
    if graphs and "cuda_graph_gb" not in observed:
        return observed
    after = (observed["available_gpu_mem_gb"] + observed["kv_size_gb"] + ref.req_to_token_pool / GB
             + (observed.get("cuda_graph_gb", 0.0) if graphs else 0.0))
    return {**observed, "avail_after_weights_gb": round(after, 4)}
