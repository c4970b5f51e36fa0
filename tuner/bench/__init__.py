"""The benchmark client: `bench_serving` run as a subprocess per workload (argv, timeout,
server-death watch, its last JSONL line parsed) and the kinds of its metrics."""
from __future__ import annotations

from tuner.bench.client import build_bench_argv, run_workload
from tuner.bench.metrics import MetricKind, higher_is_better, metric_kind

__all__ = [
    "MetricKind",
    "build_bench_argv",
    "higher_is_better",
    "metric_kind",
    "run_workload",
]
