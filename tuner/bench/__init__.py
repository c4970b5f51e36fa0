"""The benchmark client: `bench_serving` run as a subprocess per workload (argv, timeout,
server-death watch, its last JSONL line parsed) and the kinds of its metrics."""
from __future__ import annotations

from tuner.bench.client import REQUEST_TOO_LONG, build_bench_argv, request_refusal, run_workload
from tuner.bench.metrics import MIN_RETOKENIZED_SHARE, MetricKind, higher_is_better, metric_kind, retokenized_share

__all__ = [
    "REQUEST_TOO_LONG",
    "request_refusal",
    "MIN_RETOKENIZED_SHARE",
    "MetricKind",
    "build_bench_argv",
    "higher_is_better",
    "metric_kind",
    "retokenized_share",
    "run_workload",
]
