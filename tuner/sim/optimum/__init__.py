"""Ground truth for tuning quality: enumerate a search space's grid on the simulator's model
(noise off) and report the true optimum per objective.

`python -m tuner.sim optimum --scenario NAME --space FILE` prints it (see `cli.main`).

A full grid is 10^5-10^6 configurations and one `api.predict` replays hundreds of scheduler
steps, so the enumeration is exact but shares work (`SimEvaluator` holds the caches):

* start-up memory is checked once per combination of the memory knobs (`grid`);
* each workload's sequence of forwards is recorded once per scheduling key (max running,
  KV tokens, chunk, ...; values that cannot bind are collapsed) and only the step times are
  recomputed per configuration (`traces`, `evaluator`);
* a runtime OOM is decided from a trace's largest forward.

`tests/test_sim_optimum.py` checks all of this against `tuner.sim.api.predict`.

Modules: `traces` (record and price a workload), `evaluator` (`SimEvaluator`, the caches),
`grid` (`SpaceGrid`, the exhaustive search), `cli` (`main`). This package re-exports their
public names.
"""
from __future__ import annotations

from tuner.sim.optimum.cli import format_result, main, optimum
from tuner.sim.optimum.evaluator import PERF_FIELDS, Evaluation, SimEvaluator
from tuner.sim.optimum.grid import CPU_FIELDS, FLOAT_GRID_POINTS, OptimumEntry, OptimumResult, SpaceGrid, param_values
from tuner.sim.optimum.traces import (
    METRICS,
    Trace,
    WorkloadShape,
    record_trace,
    step_durations,
    total_duration,
    trace_metrics,
    workload_metrics,
)

__all__ = [
    "CPU_FIELDS", "FLOAT_GRID_POINTS", "METRICS", "PERF_FIELDS", "Evaluation", "OptimumEntry", "OptimumResult",
    "SimEvaluator", "SpaceGrid", "Trace", "WorkloadShape", "format_result", "main", "optimum", "param_values",
    "record_trace", "step_durations", "total_duration", "trace_metrics", "workload_metrics",
]
