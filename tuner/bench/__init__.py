"""The benchmark client: `bench_serving` run as a subprocess per workload (argv, timeout,
server-death watch, its last JSONL line parsed) and the kinds of its metrics."""
