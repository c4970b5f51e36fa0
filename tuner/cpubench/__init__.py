"""`kttune cpubench`: kt-kernel's own CPU MoE kernels timed on random weights of the space's
model shape, per kt-cpuinfer × kt-threadpool-count point and batch size, before any launch;
the points it shows clearly worse are skipped by the search (`prescreen`, `apply_stored`).

`sweep`, `store`, `prescreen` and `worker` need only the standard library (the worker also
numpy and kt-kernel), so ``python -m tuner.cpubench`` runs in a serving machine's Python."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuner.cpubench.prescreen import Prescreen, prescreen
from tuner.cpubench.store import bench_dir, describe_age, doctor_row, load, save, table
from tuner.cpubench.sweep import (
    CpuBenchResult,
    CpuBenchUnavailable,
    Point,
    Shape,
    SweepPlan,
    Worker,
    parse_ints,
    run_sweep,
)
from tuner.cpubench.worker import TAG as WORKER_TAG

if TYPE_CHECKING:
    from tuner.cpubench.space import Avoid, apply_stored, free_cores, plan_for_space, worker_for_space

__all__ = [
    "Avoid",
    "apply_stored",
    "CpuBenchResult",
    "CpuBenchUnavailable",
    "Point",
    "Prescreen",
    "Shape",
    "SweepPlan",
    "WORKER_TAG",
    "Worker",
    "bench_dir",
    "describe_age",
    "doctor_row",
    "free_cores",
    "load",
    "parse_ints",
    "plan_for_space",
    "prescreen",
    "run_sweep",
    "save",
    "table",
    "worker_for_space",
]
_SPACE = {"Avoid", "apply_stored", "free_cores", "plan_for_space", "worker_for_space"}


def __getattr__(name: str) -> Any:
    # The space side imports kttune's config and search (optuna): loaded on first use only.
    if name in _SPACE:
        from tuner.cpubench import space

        return getattr(space, name)
    raise AttributeError(name)
