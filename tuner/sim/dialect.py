"""What differs between the two servers the simulator plays (`--sim-dialect`): start-up log
lines and the server-info payload's ``memory_usage``.

The start-up model (:mod:`tuner.sim.perfmodel.startup`) writes sglang-kt 0.7.2's lines; for
upstream sglang 0.5.23 they are rewritten here into its formats (``mem_cache/memory_pool.py``:
a ``dtype:`` field in the KV line; ``model_runner_components/cuda_graph_setup.py``: one
``Capture target <phase> CUDA graph end. ..., mem usage=X GB, avail mem=Y GB.`` line per
captured graph). tests/sim/test_dialect_conformance.py checks both against the real sources.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

VERSIONS = {"sglang-kt": "0.7.2", "upstream": "0.5.23"}
KV_DTYPE = "torch.bfloat16"
# Upstream captures a prefill graph beside the decode graph; the simulated graph memory is split
# between them in this proportion (their sum is what the start-up model allocated).
PREFILL_GRAPH_SHARE = 0.25
_GRAPH_END = re.compile(r"^Capture cuda graph end\. Time elapsed: ([0-9.]+) s\. mem usage=([0-9.]+) GB\. "
                        r"avail mem=([0-9.]+) GB\.$")
_GRAPH_BEGIN = re.compile(r"^Capture cuda graph begin\. This can take up to several minutes\. avail mem=([0-9.]+) GB$")
# Lines that state memory figures (suppressed by --sim-no-memory-log).
MEMORY_LINE = re.compile(r"^(Load weight (begin|end)|(\w+ )?KV Cache |Memory pool end|Capture .*graph (begin|end)"
                         r"|max_total_num_tokens=|Init torch distributed ends)")


def graph_split(graph_gib: float) -> tuple[float, float]:
    """(prefill, decode) GiB of upstream's two captured graphs, as printed (2 decimals)."""
    prefill = round(graph_gib * PREFILL_GRAPH_SHARE, 2)
    return prefill, round(graph_gib - prefill, 2)


def capture_sizes(max_bs: int) -> list[int]:
    """The decode batch sizes sglang captures up to `max_bs`: 1, 2, 4, 8, then steps of 8 to 256,
    then of 16."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, max(max_bs, 272) + 1, 16))
    return [b for b in sizes if b <= max_bs] or [1]


def startup_lines(lines: Sequence[str], dialect: str, *, memory_log: bool = True, captured_bs: int = 1) -> list[str]:
    """sglang-kt start-up lines as `dialect` prints them; without `memory_log`, none that states
    a memory figure. `captured_bs`: the largest decode batch captured (upstream lists them)."""
    out: list[str] = []
    for line in lines:
        if not memory_log and MEMORY_LINE.match(line):
            continue
        if dialect != "upstream":
            out.append(line)
            continue
        if line.startswith("Load weight end. "):
            out.append(line.replace(f", dtype={KV_DTYPE}", "", 1))
        elif line.startswith("KV Cache is allocated. #tokens: "):
            out.append(line.replace("KV Cache is allocated. ", f"KV Cache is allocated. dtype: {KV_DTYPE}, ", 1))
        elif begin := _GRAPH_BEGIN.match(line):
            out.append(f"Capture target decode CUDA graph begin. backend=full, num_tokens_per_req=1, "
                       f"avail mem={begin.group(1)} GB")
        elif end := _GRAPH_END.match(line):
            elapsed, usage, avail = float(end.group(1)), float(end.group(2)), float(end.group(3))
            prefill, decode = graph_split(usage)
            out.append(f"Capture target decode CUDA graph end. bs={capture_sizes(captured_bs)}, elapsed={elapsed * 0.8:.2f} s, "
                       f"mem usage={decode:.2f} GB, avail mem={avail + prefill:.2f} GB.")
            out.append(f"Capture target prefill CUDA graph begin. backend=full, num_tokens=8192, "
                       f"avail mem={avail + prefill:.2f} GB")
            out.append(f"Capture target prefill CUDA graph end. elapsed={elapsed * 0.2:.2f} s, "
                       f"mem usage={prefill:.2f} GB, avail mem={avail:.2f} GB.")
        else:
            out.append(line)
    return out


def memory_usage(dialect: str, *, weight: float, kvcache: float, token_capacity: int, graph: float,
                 startup_available: float) -> dict[str, Any]:
    """``internal_states[i].memory_usage`` of `dialect` (GiB): sglang-kt's four keys with one
    graph float; upstream's with ``startup_available``, ``token_capacity_swa`` and graph memory
    per phase."""
    if dialect != "upstream":
        return {"weight": round(weight, 2), "kvcache": round(kvcache, 2), "token_capacity": int(token_capacity),
                "graph": round(graph, 2)}
    prefill, decode = graph_split(graph)
    phases = dict.fromkeys(("prefill", "decode", "target_verify", "draft_prefill", "draft_decode", "draft_extend"), 0.0)
    phases.update(prefill=prefill, decode=decode)
    return {"weight": round(weight, 3), "kvcache": round(kvcache, 3), "startup_available": round(startup_available, 3),
            "token_capacity": int(token_capacity), "token_capacity_swa": None, "graph": phases}
