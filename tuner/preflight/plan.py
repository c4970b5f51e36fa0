"""`kttune plan`: what a configuration needs before anything is launched."""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import yaml

from tuner.config import SearchSpace
from tuner.errors import ConfigError
from tuner.feasibility import FeasibilityGate, FeasibilityReport


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """`--set flag=value` pairs; values are read as YAML scalars (200, 0.9, true, AMXINT4)."""
    out: dict[str, Any] = {}
    for item in sets:
        flag, sep, raw = item.partition("=")
        flag = flag.strip().lstrip("-")
        if not sep or not flag:
            raise ConfigError(f"--set: {item!r} is not flag=value; e.g. --set kt-num-gpu-experts=180")
        out[flag] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def plan_flags(space: SearchSpace, sets: Sequence[str]) -> dict[str, Any]:
    """The baseline with `sets` applied. A flag must be one of the space (tuned or fixed): a
    misspelt one would otherwise leave the plan unchanged and look like an answer."""
    values = dict(space.baseline or {})
    given = parse_sets(sets)
    known = [p.flag for p in space.params] + list(space.server.args)
    for flag in given:
        if flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            fix = f"did you mean {close[0]}?" if close else "add it to server.args of the space to plan with it"
            raise ConfigError(f"--set: {flag} is not a flag of the space; {fix}")
    values.update(given)
    missing = [p.flag for p in space.params if p.flag not in values]
    if missing:
        raise ConfigError(f"--set: {', '.join(missing)} has no value (the space has no baseline); "
                          f"pass --set {missing[0]}=VALUE")
    return space.launch_flags(values)


def cpu_layout(gate: FeasibilityGate, flags: dict[str, Any]) -> str:
    cpu = gate.hardware.cpu
    threads = flags.get("kt-cpuinfer")
    pools = int(flags.get("kt-threadpool-count", 2))
    gpus = int(flags.get("tensor-parallel-size", flags.get("tp-size", 1)))
    per_pool = f"{threads / pools:.1f}" if isinstance(threads, (int, float)) else "?"
    node_cores = "/".join(str(c) for c in cpu.cores_per_node)
    return (f"CPU: {threads} kt-cpuinfer threads in {pools} pool(s) = {per_pool} per pool; "
            f"{cpu.physical_cores} physical cores ({cpu.physical_cores - gpus} beside {gpus} GPU rank(s)), "
            f"{cpu.numa_nodes} NUMA node(s) of {node_cores} cores, AMX {'yes' if cpu.amx else 'no'}")


def _plan(space: SearchSpace, sets: Sequence[str]) -> tuple[FeasibilityGate, dict[str, Any], FeasibilityReport,
                                                             tuple[int, str]]:
    gate = FeasibilityGate.for_space(space)
    flags = gate.resolve_auto(plan_flags(space, sets))
    return gate, flags, gate.check(flags), gate.largest_gpu_experts(flags)


def changeable_flags(space: SearchSpace) -> set[str]:
    """What `--set` (and so the user, through the space) can change: tuned and fixed flags."""
    return {p.flag for p in space.params} | set(space.server.args)


def plan_data(space: SearchSpace, sets: Sequence[str]) -> dict[str, Any]:
    """`kttune plan --format json`: the verdict, per-GPU breakdown (GB), constraints (≤ 0 holds),
    the fix, the CPU layout and the largest kt-num-gpu-experts that fits."""
    gate, flags, report, (n_max, bound_at) = _plan(space, sets)
    cpu = gate.hardware.cpu
    return {"title": report.title, "feasible": report.feasible, "binding": report.binding, "flags": flags,
            "gpu_memory_gb": report.breakdown_gb, "kv_capacity_tokens": report.kv_capacity_tokens,
            "kv_capacity_requests": report.kv_capacity_requests, "constraints": report.constraints,
            "soft_constraints": report.soft_constraints, "warnings": report.warnings,
            "fix": report.fix_hint(changeable_flags(space)) if not report.feasible else "",
            "cpu": {"physical_cores": cpu.physical_cores, "numa_nodes": cpu.numa_nodes,
                    "cores_per_node": list(cpu.cores_per_node), "amx": cpu.amx},
            "max_gpu_experts": n_max, "max_gpu_experts_at": bound_at, "hardware": gate.hardware.describe()}


def plan_report(space: SearchSpace, sets: Sequence[str]) -> tuple[str, bool]:
    gate, flags, report, (n_max, bound_at) = _plan(space, sets)
    lines = [report.explain(changeable_flags(space)).rstrip(), cpu_layout(gate, flags),
             f"largest kt-num-gpu-experts that fits with these settings: {n_max} (at {bound_at})"]
    return "\n".join(lines), report.feasible
