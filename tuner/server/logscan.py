"""Classify SGLang / kt-kernel server logs: failure reasons, readiness, memory figures.

Both dialects' lines are read (see docs/server-versions.md): sglang-kt 0.7.x
(``KV Cache is allocated. #tokens: N, ...``, ``Capture cuda graph end. Time elapsed: T s. mem
usage=X GB. avail mem=Y GB.``) and upstream sglang 0.5.2x (a ``dtype:`` field and an optional
label in the KV line, ``VA upper bound`` under post-capture sizing, and one comma-separated
``Capture <name> CUDA graph end. elapsed=T s, mem usage=X GB, avail mem=Y GB.`` line per graph).

Reasons are stable strings that the outcome mapping (tuner/outcome.py) keys on. OOMs are
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

# Failure lines (the server did not start or is dying), most specific first: classify_failure() returns the first that matched.
_FAILURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("exec_failed", re.compile(r"^kttune watchdog: cannot run ")),  # tuner.server.watchdog's own words
    ("unrecognized_args", re.compile(r"error: unrecognized arguments")),
    ("invalid_args", re.compile(r"error: argument -")),
    ("port_in_use", re.compile(r"address already in use", re.IGNORECASE)),
    ("kt_not_enabled", re.compile(r"Either kt_num_gpu_experts or kt_gpu_experts_ratio is required")),
    ("kv_not_enough_memory", re.compile(r"Not enough memory\. Please try to increase --mem-fraction-static")),
    # A kernel the server JIT-compiles at first use (flashinfer's RMSNorm during CUDA-graph capture
    # on upstream 0.5.11) did not build: the toolchain or the kernel sources are missing. SGLang
    # reports it as "Capture cuda graph failed" with memory advice; no configuration fixes it.
    ("kernel_build_failed", re.compile(r"Ninja build failed|ninja: error: |nvcc fatal|No such file or directory: '(?:nvcc|ninja)'")),
    ("cuda_graph_failed", re.compile(r"Capture (?:[\w-]+ )*?(?:cuda|CUDA) graph failed")),
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
FAILURE_REASONS = frozenset({name for name, _ in _FAILURES if name != "oom"} | OOM_REASONS)
WARNING_REASONS = frozenset(name for name, _ in _WARNING)
# Lines that mean the server is dying or useless even while the process still runs.
# A bare traceback is left out: SGLang logs some recoverable ones.
ABORT_REASONS = FAILURE_REASONS - {"python_exception"}

_PRIORITY = {name: i for i, (name, _) in enumerate(_FAILURES + _WARNING)}
_RANK_TAG = re.compile(r"^\[[^\]]*?\bTP(\d+)\b[^\]]*\]")


# Silent fallbacks: the server starts and serves, but not with the configuration it was given
# (the launch measured something else). Checked once the server is ready.
_SILENT_FALLBACKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # sglang-kt's kt_ep_wrapper: frequency placement without --init-expert-location FILE.pt
    ("placement_fallback", re.compile(r"Using frequency-based strategy WITHOUT activation frequency data")),
)
FALLBACK_REASONS = frozenset(name for name, _ in _SILENT_FALLBACKS)


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
        if _KV_LINE.search(line) or READY_LINE in line or _GRAPH_CAPTURE.search(line):
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
        for reason, pattern in _FAILURES + _WARNING:
            if pattern.search(line):
                if reason == "oom":
                    reason = phase.oom_reason()
                found.append(FailureMatch(reason, line_no, line.strip()))
                break
        phase.feed(line)
    return found


def silent_fallback(text: str) -> FailureMatch | None:
    """The first line where the server says it runs another configuration than asked for."""
    for i, line in enumerate(text.splitlines(), 1):
        for reason, pattern in _SILENT_FALLBACKS:
            if pattern.search(line):
                return FailureMatch(reason, i, line.strip())
    return None


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
    for reason, pattern in _FAILURES:
        if pattern.search(line):
            return reason if reason == "oom" or reason in ABORT_REASONS else None
    return None


# Lines that say how a process died, better than the generic "scheduler is dead" they come with.
_CRASH_DETAIL = re.compile(r"Segmentation fault|Fatal Python error|SIGSEGV|SIGBUS|Bus error|Illegal instruction|"
                           r"core dumped|Killed process")
_GENERIC_DEATH = frozenset({"scheduler_dead", "child_failed", "python_exception"})
_DECISIVE_MAX = 300


def decisive_line(text: str) -> str | None:
    """The one log line a user should read first: the line that classify_failure() names its
    reason after (warnings left out); for a process that merely "died", the line saying how
    (a segfault) if the log has one; for a bare traceback, the exception it ends with."""
    match = first_failure(text, include_warnings=False)
    lines = text.splitlines()
    if match is None or match.reason in _GENERIC_DEATH:
        detail = next((ln.strip() for ln in lines if _CRASH_DETAIL.search(ln)), None)
        if detail is not None:
            return detail[:_DECISIVE_MAX]
    if match is None:
        return None
    if match.reason == "python_exception" or match.line.endswith("Traceback (most recent call last):"):
        after = lines[match.line_no:]
        # The exception line: the first unindented line after the frames.
        exc = next((ln.strip() for ln in after if ln.strip() and not ln.startswith((" ", "\t"))), None)
        if exc is not None:
            return exc[:_DECISIVE_MAX]
    return match.line[:_DECISIVE_MAX]


# Start-up phases in the order sglang reaches them, one parser per line (startup_phase). A
# stall is no new phase, and no step of a progress bar, for server.stall_timeout_s.
PHASES = ("server args parsed", "distributed init", "weights loading", "weights loaded", "KV cache allocated",
          "memory pool ready", "CUDA graphs capturing", "CUDA graphs captured", "scheduler ready", "HTTP up",
          "ready")
_PHASE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ready", re.compile(re.escape(READY_LINE))),
    ("HTTP up", re.compile("|".join(re.escape(m) for m in HTTP_UP_MARKERS))),
    ("scheduler ready", re.compile(r"max_total_num_tokens=\d+")),
    ("CUDA graphs captured", re.compile(r"Capture cuda graph end")),
    ("CUDA graphs capturing", re.compile(r"Capture cuda graph begin")),
    ("memory pool ready", re.compile(r"Memory pool end")),
    ("KV cache allocated", re.compile(r"KV Cache is allocated")),
    ("weights loaded", re.compile(r"Load weight end")),
    ("weights loading", re.compile(r"Load weight begin|Loading safetensors checkpoint shards|Using kt_num_gpu_experts")),
    ("distributed init", re.compile(r"Init torch distributed")),
    ("server args parsed", re.compile(r"server_args=ServerArgs\(")),
)
# A warm-up (or any forward) in progress: the scheduler logs its batches, uvicorn its requests.
_ACTIVITY = re.compile(r"(Prefill|Decode) batch[.,]|\"(GET|POST) /(generate|model_info|get_model_info)")
_PROGRESS_STEP = re.compile(r"(\d+)% Completed")


def startup_phase(line: str) -> str | None:
    """The start-up phase this line announces (a name in PHASES), or None."""
    for name, pattern in _PHASE_PATTERNS:
        if pattern.search(line):
            return name
    return None


def shows_progress(line: str) -> bool:
    """A line that proves the server is moving without naming a new phase: a progress-bar step
    (``Loading safetensors checkpoint shards: 40% Completed``), a batch, a warm-up request."""
    return bool(_PROGRESS_STEP.search(line) or _ACTIVITY.search(line))


_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"
_MEM_USAGE = re.compile(r"mem usage=" + _FLOAT + r" GB")
_AVAIL = re.compile(r"avail mem=" + _FLOAT + r" GB")
_WEIGHT_BEGIN = re.compile(r"Load weight begin\. avail mem=" + _FLOAT + " GB")
# "[label ]KV Cache is allocated|VA upper bound.[ dtype: D,] #tokens: N": the label and dtype
# are upstream's; the pool's size follows as "KV size" (MLA) or "K size ..., V size ..." (MHA).
_KV_LINE = re.compile(r"KV Cache (?:is allocated|VA upper bound)\.(?: dtype: [^,]*,)? #tokens: (\d+)")
_KV_MLA = re.compile(_KV_LINE.pattern + r", KV size: " + _FLOAT + " GB")
_KV_GQA = re.compile(_KV_LINE.pattern + r", K size: " + _FLOAT + r" GB, V size: " + _FLOAT + " GB")
# One line per captured graph: "Capture cuda graph end." and "Capture piecewise CUDA graph end."
# (sglang-kt), "Capture target decode CUDA graph end." (upstream); begin lines share the stem.
_GRAPH_CAPTURE = re.compile(r"Capture (?:[\w-]+ )*?(?:cuda|CUDA) graph (?:begin|end)\b")
_GRAPH_END = re.compile(r"Capture (?:[\w-]+ )*?(?:cuda|CUDA) graph end\.")
_CLIP = re.compile(r"max_total_tokens=(\d+) is larger than the profiled value (\d+)")
_SUMMARY_INT = ("max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "context_len")
_SUMMARY_AVAIL = re.compile(r"available_gpu_mem=" + _FLOAT + " GB")
_KT_PER_LAYER = re.compile(r"Using kt_num_gpu_experts=(\d+) per layer")
_KT_TOTAL = re.compile(r"total GPU experts: (\d+)")
_CUDA_OOM = "CUDA out of memory"
_NOT_ENOUGH_MEMORY = dict(_FAILURES)["kv_not_enough_memory"]


# One parser per memory line; sizes in GiB, as printed. Each returns None for other lines.
def weight_load_begin(line: str) -> float | None:
    """Free GiB before the weights load: ``Load weight begin. avail mem=X GB``."""
    m = _WEIGHT_BEGIN.search(line)
    return float(m.group(1)) if m else None


def weight_load_end(line: str) -> tuple[float | None, float | None] | None:
    """(avail GiB, weights GiB) from ``Load weight end. ... avail mem=X GB, mem usage=Y GB``
    (either may be missing; their order varies between versions)."""
    if "Load weight end" not in line:
        return None
    usage, avail = _MEM_USAGE.search(line), _AVAIL.search(line)
    return (float(avail.group(1)) if avail else None, float(usage.group(1)) if usage else None)


def kv_cache_allocated(line: str) -> tuple[int, float | None] | None:
    """(tokens, KV GiB) from ``KV Cache is allocated. #tokens: N, KV size: X GB`` (MLA) or
    ``..., K size: X GB, V size: Y GB`` (GQA: K + V); the size is None when neither form follows."""
    if gqa := _KV_GQA.search(line):
        return int(gqa.group(1)), float(gqa.group(2)) + float(gqa.group(3))
    if mla := _KV_MLA.search(line):
        return int(mla.group(1)), float(mla.group(2))
    m = _KV_LINE.search(line)
    return (int(m.group(1)), None) if m else None


def kv_clip(line: str) -> tuple[int, int] | None:
    """(requested, profiled) tokens from ``max_total_tokens=N is larger than the profiled value M``."""
    m = _CLIP.search(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


def memory_pool_end(line: str) -> float | None:
    """Free GiB after the KV and req-to-token pools: ``Memory pool end. avail mem=X GB``."""
    if "Memory pool end" not in line:
        return None
    m = _AVAIL.search(line)
    return float(m.group(1)) if m else None


def cuda_graph_end(line: str) -> tuple[float | None, float | None] | None:
    """(graph GiB, avail GiB) of one captured graph: ``Capture cuda graph end. ... mem usage=X GB.
    avail mem=Y GB.`` (sglang-kt) or ``Capture <name> CUDA graph end. ..., mem usage=X GB, avail
    mem=Y GB.`` (upstream)."""
    if not _GRAPH_END.search(line):
        return None
    usage, avail = _MEM_USAGE.search(line), _AVAIL.search(line)
    return (float(usage.group(1)) if usage else None, float(avail.group(1)) if avail else None)


def scheduler_figures(line: str) -> dict[str, Any]:
    """The ``key=value`` figures of the scheduler's summary (``max_total_num_tokens=N, ...,
    available_gpu_mem=X GB``) found in ``line``: the ints by name, ``available_gpu_mem_gib``."""
    out: dict[str, Any] = {}
    for key in _SUMMARY_INT:
        if m := re.search(rf"\b{key}=(-?\d+)", line):
            out[key] = int(m.group(1))
    if m := _SUMMARY_AVAIL.search(line):
        out["available_gpu_mem_gib"] = float(m.group(1))
    return out


def kt_gpu_experts(line: str) -> tuple[int | None, int | None]:
    """(per layer, total) from KT's ``Using kt_num_gpu_experts=N per layer, total GPU experts: M``."""
    per_layer, total = _KT_PER_LAYER.search(line), _KT_TOTAL.search(line)
    return (int(per_layer.group(1)) if per_layer else None, int(total.group(1)) if total else None)


def parse_memory_lines(text: str) -> dict[str, Any]:
    """Memory figures from the startup log, in the order sglang starts up (weights, KV pool,
    CUDA graphs, scheduler summary); only keys that were found.

    Keys: ``weight_mem_gib`` (max over TP ranks; TP0 also holds the KT staging buffer),
    ``weight_mem_gib_by_rank`` ({rank: GiB}), ``weight_avail_gib`` (min over ranks),
    ``kv_tokens``, ``kv_size_gib`` (K+V for GQA), ``kv_clip_requested_tokens`` and
    ``kv_clip_profiled_tokens`` (the "larger than the profiled value" warning),
    ``pool_avail_gib``, ``cuda_graph_mem_gib`` (all graphs a rank captured, the largest rank),
    ``cuda_graph_avail_gib``, ``weight_begin_avail_gib`` (free before the weights), and from the
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

    graphs_by_rank: dict[int, float] = {}
    for line in text.splitlines():
        rank = _rank(line) or 0
        if (begin := weight_load_begin(line)) is not None:
            keep_min("weight_begin_avail_gib", begin)
        elif (end := weight_load_end(line)) is not None:
            avail, usage = end
            if usage is not None:
                by_rank[rank] = usage
            if avail is not None:
                keep_min("weight_avail_gib", avail)
        elif (kv := kv_cache_allocated(line)) is not None and kv[1] is not None:
            keep_min("kv_tokens", kv[0])
            keep_max("kv_size_gib", kv[1])
        elif (clip := kv_clip(line)) is not None:
            out["kv_clip_requested_tokens"] = clip[0]
            keep_min("kv_clip_profiled_tokens", clip[1])
        elif "Memory pool end" in line:
            if (avail := memory_pool_end(line)) is not None:
                keep_min("pool_avail_gib", avail)
        elif (graph := cuda_graph_end(line)) is not None:
            usage, avail = graph
            if usage is not None:
                graphs_by_rank[rank] = graphs_by_rank.get(rank, 0.0) + usage
            if avail is not None:
                keep_min("cuda_graph_avail_gib", avail)
        elif "max_total_num_tokens=" in line:
            out.update(scheduler_figures(line))
    if graphs_by_rank:
        out["cuda_graph_mem_gib"] = round(max(graphs_by_rank.values()), 4)
    if by_rank:
        out["weight_mem_gib_by_rank"] = by_rank
        out["weight_mem_gib"] = max(by_rank.values())
    return out


_WORST_MIN = ("weight_begin_avail_gib", "weight_avail_gib", "kv_tokens", "available_gpu_mem_gib",
              "max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "context_len")


def worst_memory_figures(text: str) -> dict[str, Any]:
    """Every memory figure of the log at its worst over all lines that report it (all TP ranks,
    any repeats): free memory and token counts at their minimum, usage and expert counts at their
    maximum; GiB as printed. Only keys that were found, as :func:`parse_memory_lines` names them,
    plus ``weight_begin_avail_gib``, ``kt_gpu_experts_per_layer`` and ``kt_total_gpu_experts``;
    ``kv_clip_*`` come from the first clip warning; the scheduler's figures are read from any
    line that states them. Always present: ``cuda_oom`` ("CUDA out of memory" anywhere) and
    ``kv_not_enough_memory`` (the KV profiler found no room)."""
    found: dict[str, list[Any]] = {}

    def add(key: str, value: Any) -> None:
        if value is not None:
            found.setdefault(key, []).append(value)

    clip: tuple[int, int] | None = None
    graphs_by_rank: dict[int, float] = {}
    for line in text.splitlines():
        add("weight_begin_avail_gib", weight_load_begin(line))
        if (end := weight_load_end(line)) is not None:
            add("weight_avail_gib", end[0])
            add("weight_mem_gib", end[1])
        if (kv := kv_cache_allocated(line)) is not None:
            add("kv_tokens", kv[0])
            add("kv_size_gib", kv[1])
        if clip is None:
            clip = kv_clip(line)
        if (graph := cuda_graph_end(line)) is not None and graph[0] is not None:
            rank = _rank(line) or 0
            graphs_by_rank[rank] = graphs_by_rank.get(rank, 0.0) + graph[0]
        for key, value in scheduler_figures(line).items():
            add(key, value)
        per_layer, total = kt_gpu_experts(line)
        add("kt_gpu_experts_per_layer", per_layer)
        add("kt_total_gpu_experts", total)
    if graphs_by_rank:  # one line per captured graph: a rank's graphs add up
        found["cuda_graph_mem_gib"] = [round(v, 4) for v in graphs_by_rank.values()]
    out: dict[str, Any] = {key: (min if key in _WORST_MIN else max)(values) for key, values in found.items()}
    if clip is not None:
        out["kv_clip_requested_tokens"], out["kv_clip_profiled_tokens"] = clip
    out["cuda_oom"] = _CUDA_OOM in text
    out["kv_not_enough_memory"] = bool(_NOT_ENOUGH_MEMORY.search(text))
    return out


def runtime_oom(text: str) -> bool:
    """An out-of-memory error after the server reported itself ready (a forward, not start-up):
    after the scheduler's summary (``available_gpu_mem=``) or the ready line, whichever is last."""
    ready = max(text.rfind("available_gpu_mem="), text.rfind("The server is fired up"))
    return ready >= 0 and "out of memory" in text[ready:]
