"""Classify SGLang / kt-kernel server logs: failure reasons, readiness, memory figures.

Reasons are stable strings that the outcome mapping keys on (facts doc §5). OOMs are
split by startup phase: ``oom_weights`` (before every TP rank logged ``Load weight
end``), ``oom_kv_alloc`` (weights loaded, KV pool not yet allocated) and ``oom``
(later, including run time). Sizes in SGLang logs are GiB printed as "GB"; the parsed
keys therefore end in ``_gib``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

READY_LINE = "The server is fired up and ready to roll!"
HTTP_UP_MARKERS = ("Uvicorn running on", "Application startup complete")

# Fatal reasons, most specific first: classify_failure() returns the first that matched.
_FATAL: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("unrecognized_args", re.compile(r"error: unrecognized arguments")),
    ("invalid_args", re.compile(r"error: argument -")),
    ("port_in_use", re.compile(r"address already in use", re.IGNORECASE)),
    ("kt_not_enabled", re.compile(r"Either kt_num_gpu_experts or kt_gpu_experts_ratio is required")),
    ("kv_not_enough_memory", re.compile(r"Not enough memory\. Please try to increase --mem-fraction-static")),
    ("cuda_graph_failed", re.compile(r"Capture cuda graph failed")),
    ("oom", re.compile(r"CUDA out of memory|torch\.OutOfMemoryError|CUDA error: out of memory")),
    ("watchdog_timeout", re.compile(r"[Ww]atchdog timeout")),
    ("warmup_failed", re.compile(r"Initialization failed\. warmup error")),
    ("scheduler_exception", re.compile(r"Scheduler hit an exception")),
    ("scheduler_dead", re.compile(r"scheduler is dead")),
    ("child_failed", re.compile(r"Received sigquit from a child process")),
    ("python_exception", re.compile(r"^Traceback \(most recent call last\):")),
)
# Warnings: the server keeps running, but the outcome should know.
_WARNING: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("runtime_kv_full", re.compile(r"KV cache pool is full\. Retract requests")),
    ("kv_clipped", re.compile(r"is larger than the profiled value")),
)

OOM_REASONS = frozenset({"oom_weights", "oom_kv_alloc", "oom"})
FATAL_REASONS = frozenset({name for name, _ in _FATAL if name != "oom"} | OOM_REASONS)
WARNING_REASONS = frozenset(name for name, _ in _WARNING)
# Lines that mean the server is dying or useless even while the process still runs.
# A bare traceback is left out: SGLang logs some recoverable ones.
ABORT_REASONS = FATAL_REASONS - {"python_exception"}

_PRIORITY = {name: i for i, (name, _) in enumerate(_FATAL + _WARNING)}
_RANK_TAG = re.compile(r"^\[[^\]]*?\bTP(\d+)\b[^\]]*\]")


@dataclass(frozen=True)
class FailureMatch:
    """One log line that matched a failure or warning pattern (line_no is 1-based)."""

    reason: str
    line_no: int
    line: str


def _priority(reason: str) -> int:
    return _PRIORITY["oom"] if reason in OOM_REASONS else _PRIORITY[reason]


def _rank(line: str) -> int | None:
    m = _RANK_TAG.match(line)
    return int(m.group(1)) if m else None


class _Phase:
    """Tracks how far startup got, to tell weight-load OOMs from KV-allocation OOMs."""

    def __init__(self) -> None:
        self.ranks_seen: set[int] = set()
        self.ranks_loaded: set[int] = set()
        self.any_loaded = False
        self.kv_allocated = False

    def feed(self, line: str) -> None:
        rank = _rank(line)
        if rank is not None:
            self.ranks_seen.add(rank)
        if "Load weight end" in line:
            self.any_loaded = True
            if rank is not None:
                self.ranks_loaded.add(rank)
        if "KV Cache is allocated" in line or READY_LINE in line or "Capture cuda graph" in line:
            self.kv_allocated = True

    def oom_reason(self) -> str:
        if self.kv_allocated:
            return "oom"
        if not self.any_loaded:
            return "oom_weights"
        if self.ranks_loaded and not self.ranks_seen <= self.ranks_loaded:
            return "oom_weights"  # some TP rank was still loading
        return "oom_kv_alloc"


def find_failures(text: str) -> list[FailureMatch]:
    """Every line matching a failure or warning pattern, in log order (one reason per line)."""
    phase = _Phase()
    found: list[FailureMatch] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        for reason, pattern in _FATAL + _WARNING:
            if pattern.search(line):
                if reason == "oom":
                    reason = phase.oom_reason()
                found.append(FailureMatch(reason, line_no, line.strip()))
                break
        phase.feed(line)
    return found


def classify_failure(text: str, *, include_warnings: bool = True) -> str | None:
    """The most specific failure reason in ``text``; else a warning reason
    (``runtime_kv_full``, ``kv_clipped``) unless ``include_warnings`` is False; else None."""
    match = first_failure(text, include_warnings=include_warnings)
    return match.reason if match else None


def first_failure(text: str, *, include_warnings: bool = True) -> FailureMatch | None:
    """The match classify_failure() reports: highest priority, earliest on ties."""
    found = [
        m for m in find_failures(text) if include_warnings or m.reason not in WARNING_REASONS
    ]
    if not found:
        return None
    return min(found, key=lambda m: (_priority(m.reason), m.line_no))


def line_abort_reason(line: str) -> str | None:
    """The ABORT reason one line signals on its own (OOMs unphased, as ``oom``), or None.

    Cheap per-line check for readiness polling; classify the whole log for the final reason.
    """
    for reason, pattern in _FATAL:
        if pattern.search(line):
            return reason if reason == "oom" or reason in ABORT_REASONS else None
    return None


_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"
_MEM_USAGE = re.compile(r"mem usage=" + _FLOAT + r" GB")
_AVAIL = re.compile(r"avail mem=" + _FLOAT + r" GB")
_KV_MLA = re.compile(r"KV Cache is allocated\. #tokens: (\d+), KV size: " + _FLOAT + " GB")
_KV_GQA = re.compile(r"KV Cache is allocated\. #tokens: (\d+), K size: " + _FLOAT + r" GB, V size: " + _FLOAT + " GB")
_CLIP = re.compile(r"max_total_tokens=(\d+) is larger than the profiled value (\d+)")
_SUMMARY_INT = ("max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "context_len")
_SUMMARY_AVAIL = re.compile(r"available_gpu_mem=" + _FLOAT + " GB")


def parse_memory_lines(text: str) -> dict[str, Any]:
    """Memory figures from the startup log (facts §4.1); only keys that were found.

    Keys: ``weight_mem_gib`` (max over TP ranks; TP0 also holds the KT staging buffer),
    ``weight_mem_gib_by_rank`` ({rank: GiB}), ``weight_avail_gib`` (min over ranks),
    ``kv_tokens``, ``kv_size_gib`` (K+V for GQA), ``kv_clip_requested_tokens`` and
    ``kv_clip_profiled_tokens`` (the "larger than the profiled value" warning),
    ``pool_avail_gib``, ``cuda_graph_mem_gib``, ``cuda_graph_avail_gib``, and from the
    scheduler summary ``max_total_num_tokens``, ``chunked_prefill_size``,
    ``max_prefill_tokens``, ``max_running_requests``, ``context_len``,
    ``available_gpu_mem_gib``. Untagged lines count as rank 0.
    """
    out: dict[str, Any] = {}
    by_rank: dict[int, float] = {}

    def keep_min(key: str, value: float) -> None:
        out[key] = min(out.get(key, value), value)

    def keep_max(key: str, value: float) -> None:
        out[key] = max(out.get(key, value), value)

    for line in text.splitlines():
        rank = _rank(line) or 0
        if "Load weight end" in line:
            if m := _MEM_USAGE.search(line):
                by_rank[rank] = float(m.group(1))
            if m := _AVAIL.search(line):
                keep_min("weight_avail_gib", float(m.group(1)))
        elif m := _KV_GQA.search(line):
            keep_min("kv_tokens", int(m.group(1)))
            keep_max("kv_size_gib", float(m.group(2)) + float(m.group(3)))
        elif m := _KV_MLA.search(line):
            keep_min("kv_tokens", int(m.group(1)))
            keep_max("kv_size_gib", float(m.group(2)))
        elif m := _CLIP.search(line):
            out["kv_clip_requested_tokens"] = int(m.group(1))
            keep_min("kv_clip_profiled_tokens", int(m.group(2)))
        elif "Memory pool end" in line:
            if m := _AVAIL.search(line):
                keep_min("pool_avail_gib", float(m.group(1)))
        elif "Capture cuda graph end" in line:
            if m := _MEM_USAGE.search(line):
                keep_max("cuda_graph_mem_gib", float(m.group(1)))
            if m := _AVAIL.search(line):
                keep_min("cuda_graph_avail_gib", float(m.group(1)))
        elif "max_total_num_tokens=" in line:
            for key in _SUMMARY_INT:
                if m := re.search(rf"\b{key}=(-?\d+)", line):
                    out[key] = int(m.group(1))
            if m := _SUMMARY_AVAIL.search(line):
                out["available_gpu_mem_gib"] = float(m.group(1))
    if by_rank:
        out["weight_mem_gib_by_rank"] = by_rank
        out["weight_mem_gib"] = max(by_rank.values())
    return out
