"""The server-info endpoint read back after readiness: what the server says it allocated.

Both dialects answer ``GET /server_info`` (older builds only ``/get_server_info``, which
0.7.2 and 0.5.23 keep as a deprecated alias) with ``internal_states``: one entry per
data-parallel rank, each with ``memory_usage`` (GiB, as the log prints them):

- sglang-kt 0.7.2 (``srt/managers/scheduler.py`` ``get_internal_state``):
  ``{weight, kvcache, token_capacity, graph}``, ``graph`` one float;
- upstream 0.5.23 (``srt/managers/scheduler_components/memory_usage.py``
  ``build_memory_usage``): ``{weight, kvcache, startup_available, token_capacity,
  token_capacity_swa, graph: {phase: GiB}}``.

The figures are returned under the names :func:`tuner.server.logscan.parse_memory_lines`
gives the same quantities, so a read-back figure replaces the logged one and the log fills in
the rest (free memory before and after the weights is only in the log).
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

# Tried in order; the first that answers 200 with a JSON object is read.
SERVER_INFO_ENDPOINTS = ("/server_info", "/get_server_info")
# memory_usage key → (figure name as logscan names it, worst over DP ranks).
_MEMORY_KEYS: tuple[tuple[str, str, str], ...] = (
    ("weight", "weight_mem_gib", "max"),
    ("kvcache", "kv_size_gib", "max"),
    ("token_capacity", "kv_tokens", "min"),
    ("token_capacity", "max_total_num_tokens", "min"),
    ("graph", "cuda_graph_mem_gib", "max"),
    ("startup_available", "available_gpu_mem_gib", "min"),
)


def fetch_server_info(base_url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                      endpoints: Sequence[str] = SERVER_INFO_ENDPOINTS) -> tuple[str, dict[str, Any]] | None:
    """(endpoint, payload) of the first endpoint that answers with a JSON object; None when
    none does (the read-back is optional: the log remains)."""
    for path in endpoints:
        req = urllib.request.Request(base_url + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                data = json.loads(resp.read().decode("utf-8", errors="replace"))
        except (OSError, ValueError, urllib.error.URLError):
            continue
        if isinstance(data, dict):
            return path, data
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def graph_gib(value: Any) -> float | None:
    """Graph memory of one rank: a float (sglang-kt) or the sum of a per-phase dict (upstream)."""
    if isinstance(value, Mapping):
        parts = [_number(v) for v in value.values()]
        found = [p for p in parts if p is not None]
        return round(sum(found), 4) if found else None
    return _number(value)


def memory_from_server_info(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The memory figures of a server-info payload, named as the log parser names them
    (``weight_mem_gib``, ``kv_size_gib``, ``kv_tokens``, ``max_total_num_tokens``,
    ``cuda_graph_mem_gib``, ``available_gpu_mem_gib``); only those reported, at their worst
    over the DP ranks. A disaggregated server's payload nests its decode instance first."""
    if isinstance(payload.get("decode"), list) and payload["decode"]:
        payload = payload["decode"][0]
    states = payload.get("internal_states")
    if not isinstance(states, list):
        return {}
    found: dict[str, list[float]] = {}
    for state in states:
        usage = state.get("memory_usage") if isinstance(state, Mapping) else None
        if not isinstance(usage, Mapping):
            continue
        for source, name, _ in _MEMORY_KEYS:
            value = graph_gib(usage.get(source)) if source == "graph" else _number(usage.get(source))
            if value is not None:
                found.setdefault(name, []).append(value)
    out: dict[str, Any] = {}
    for _, name, worst in _MEMORY_KEYS:
        if name in found:
            value = (min if worst == "min" else max)(found[name])
            out[name] = int(value) if name in ("kv_tokens", "max_total_num_tokens") else value
    return out
