"""Which bench client `bench.python` has, and what it can report.

Upstream sglang 0.5.23 runs it as ``python -m sglang.benchmark.serving`` (``sglang.bench_serving``
is a deprecated shim there); sglang-kt 0.7.2 only has ``sglang.bench_serving``. The module is
found from the installed package's files, without importing it (the probe runs in
``bench.python``), unless the space names ``bench.module``. Whether the client takes
``--goodput ttft:X tpot:Y e2el:Z`` (upstream's ``benchmark/goodput.py``: ``request_goodput``,
``slo_attainment`` in its result line) is read from the same source.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Mapping, Sequence

from tuner.config import BenchSpec, SearchSpace, SloSpec
from tuner.errors import ConfigError

UPSTREAM_MODULE = "sglang.benchmark.serving"
SGLANG_KT_MODULE = "sglang.bench_serving"
# Preferred first: where both exist, the old name is upstream's deprecated shim.
_CANDIDATES = (UPSTREAM_MODULE, SGLANG_KT_MODULE)
_TAG = "KTTUNE_BENCH "
_PROBE = r"""
import importlib.util, json, os, sys
out = {"modules": {}}
spec = importlib.util.find_spec("sglang")
roots = list(spec.submodule_search_locations or []) if spec else []
for name in sys.argv[1:]:
    rel = os.path.join(*name.split(".")[1:]) + ".py"
    for root in roots:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                text = f.read()
            out["modules"][name] = {"path": path, "goodput": '"--goodput"' in text}
            break
print("KTTUNE_BENCH " + json.dumps(out))
"""
# SLO metric suffix → the --goodput key whose per-request latency it bounds.
_GOODPUT_KEYS = (("_ttft_ms", "ttft"), ("_tpot_ms", "tpot"), ("_e2e_latency_ms", "e2el"))


def probe_bench_modules(python: str, env: Mapping[str, str], timeout_s: float = 60.0) -> dict[str, dict[str, object]]:
    """{module: {path, goodput}} of the bench client modules `python`'s sglang has (none: {})."""
    try:
        res = subprocess.run([python, "-c", _PROBE, *_CANDIDATES], capture_output=True, text=True, timeout=timeout_s,
                             env={**os.environ, **env}, stdin=subprocess.DEVNULL, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    for line in res.stdout.splitlines():
        if line.startswith(_TAG):
            try:
                data = json.loads(line[len(_TAG):])
            except ValueError:
                return {}
            return dict(data.get("modules") or {})
    return {}


def resolve_bench(space: SearchSpace, *, probe: Mapping[str, dict[str, object]] | None = None) -> SearchSpace:
    """`space` with `bench.module` found (when the space leaves it out) and `bench.goodput` set
    where that client takes ``--goodput``. Raises ConfigError when no client is installed."""
    bench = space.bench
    found = probe if probe is not None else probe_bench_modules(bench.python, bench.env)
    module = bench.module
    if module is None:
        module = next((m for m in _CANDIDATES if m in found), None)
        if module is None:
            raise ConfigError(f"bench.python: {bench.python} has neither {UPSTREAM_MODULE} nor {SGLANG_KT_MODULE}; "
                              "install sglang there (scripts/bench-venv.sh) or set bench.module")
    goodput = bool((found.get(module) or {}).get("goodput"))
    return dataclasses.replace(space, bench=dataclasses.replace(bench, module=module, goodput=goodput))


def goodput_slos(slos: Sequence[SloSpec], workload: str, *, time_scale: float = 1.0) -> dict[str, float]:
    """The ``--goodput`` bounds (ms per request) the space's SLOs on `workload` give: each upper
    bound on a TTFT, TPOT or end-to-end latency metric (mean, median or a percentile alike: a
    request meets it when its own latency is within it), the tightest per key. A time-scaled
    server runs faster by `time_scale`: its bounds shrink alike."""
    out: dict[str, float] = {}
    for slo in slos:
        if slo.workload != workload or slo.max is None:
            continue
        key = next((k for suffix, k in _GOODPUT_KEYS if slo.metric.endswith(suffix)), None)
        if key is not None:
            out[key] = min(out.get(key, slo.max * time_scale), slo.max * time_scale)
    return out


def goodput_args(bench: BenchSpec, slos: Sequence[SloSpec], workload: str) -> list[str]:
    """``--goodput ttft:X ...`` for a client that takes it and SLOs that map onto it, else []."""
    if not bench.goodput:
        return []
    bounds = goodput_slos(slos, workload, time_scale=bench.time_scale)
    return ["--goodput", *(f"{k}:{v:g}" for k, v in bounds.items())] if bounds else []
