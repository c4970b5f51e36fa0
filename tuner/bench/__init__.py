"""The benchmark client: `bench_serving` run as a subprocess per workload (argv, timeout,
server-death watch, its last JSONL line parsed), which client module `bench.python` has, and
the kinds of its metrics."""
from __future__ import annotations

from tuner.bench.client import REQUEST_TOO_LONG, build_bench_argv, request_refusal, run_workload
from tuner.bench.dialect import SGLANG_KT_MODULE, UPSTREAM_MODULE, goodput_slos, probe_bench_modules, resolve_bench
from tuner.bench.metrics import MIN_RETOKENIZED_SHARE, MetricKind, higher_is_better, metric_kind, retokenized_share

__all__ = [
    "SGLANG_KT_MODULE",
    "UPSTREAM_MODULE",
    "goodput_slos",
    "probe_bench_modules",
    "resolve_bench",
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
