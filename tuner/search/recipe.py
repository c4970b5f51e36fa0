"""The warm start: the KTransformers deployment recipe for the knobs it covers (kt-cpuinfer
= physical cores − GPUs, kt-threadpool-count = NUMA nodes, max-running-requests ≥ the
concurrency the workloads offer), the baseline's values for the rest. Enqueued once per study
after the baseline; the capacity flag is left for the sampler to put on its fitting boundary."""
from __future__ import annotations

from typing import Any

import optuna

from tuner.config import CAPACITY_FLAGS, SearchSpace
from tuner.feasibility import FeasibilityGate
from tuner.log import Log
from tuner.search.grid import _ordered, param_grid, snap
from tuner.storage import ATTR_WARM_START, STUDY_ATTR_WARM_STARTED


def recipe(space: SearchSpace, gate: FeasibilityGate | None) -> dict[str, Any]:
    """The warm-start values of every non-capacity param (see the module doc)."""
    base = dict(space.baseline or {})
    out: dict[str, Any] = {}
    hw = gate.hardware if gate is not None else None
    flags = space.launch_flags(base)
    tp = _int(flags.get("tensor-parallel-size", flags.get("tp-size", 1))) or 1
    offered = max((w.max_concurrency or w.num_prompts) for w in space.workloads)
    for p in space.params:
        grid = param_grid(p)
        if p.flag in CAPACITY_FLAGS:
            continue
        numeric = _ordered(grid)
        if p.flag == "kt-cpuinfer" and hw is not None and numeric:
            out[p.flag] = snap(grid, max(hw.cpu.physical_cores - tp, 1))
        elif p.flag == "kt-threadpool-count" and gate is not None and hw is not None and numeric:
            inter = getattr(gate.model, "moe_intermediate_size", 0) or 0
            ok = [v for v in grid if v <= hw.cpu.numa_nodes and (not inter or inter % int(v) == 0)]
            out[p.flag] = max(ok) if ok else snap(grid, hw.cpu.numa_nodes)
        elif p.flag == "max-running-requests" and numeric:
            out[p.flag] = snap(grid, offered, down=False)
        elif p.flag in base:
            out[p.flag] = base[p.flag]
        else:
            out[p.flag] = grid[len(grid) // 2]
    return out


def warm_start(study: optuna.Study, space: SearchSpace, gate: FeasibilityGate | None, log: Log = print) -> bool:
    """Enqueue the recipe once per study (after the baseline), unless the study's sampler is
    a strategy without warm start. The capacity flag is left out so the sampler sets it at
    ask time from the then-current memory calibration."""
    strategy = getattr(study.sampler, "strategy", None)
    if strategy is None or not strategy.warm or study.user_attrs.get(STUDY_ATTR_WARM_STARTED):
        return False
    study.set_user_attr(STUDY_ATTR_WARM_STARTED, True)
    params = recipe(space, gate)
    study.enqueue_trial(params, user_attrs={ATTR_WARM_START: True}, skip_if_exists=True)
    log("warm start enqueued: " + " ".join(f"{k}={v}" for k, v in params.items()))
    return True


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
