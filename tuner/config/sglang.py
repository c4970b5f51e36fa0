"""What a space may name of sglang-kt's own interfaces, read from its source (sglang-kt 0.7.2):
the metrics `sglang.bench_serving` writes into its result line, the datasets its parser
accepts, and the launch flags `sglang.launch_server` parses as whole numbers.

A space that names anything else fails only after a full model load (a metric that is never
reported, an `invalid choice` of the client) or on a proposal the server rejects (`--x 23.5`
for an int flag), so the parser refuses it up front. tests/config/test_sglang_interfaces.py
reads these sets from the installed bench client and server source and fails when they drift.
"""
from __future__ import annotations

SOURCE_VERSION = "sglang-kt 0.7.2"

#: The measured keys of bench_serving's result line (its `result` dict in `benchmark`, without
#: the keys that echo its arguments: backend, dataset_name, request_rate, …).
BENCH_METRICS = frozenset({
    "duration", "completed", "total_input_tokens", "total_input_text_tokens", "total_input_vision_tokens",
    "total_output_tokens", "total_output_tokens_retokenized", "request_throughput", "input_throughput",
    "output_throughput", "total_throughput", "mean_e2e_latency_ms", "median_e2e_latency_ms", "std_e2e_latency_ms",
    "p90_e2e_latency_ms", "p99_e2e_latency_ms", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "std_itl_ms",
    "p95_itl_ms", "p99_itl_ms", "concurrency", "accept_length", "max_output_tokens_per_s",
    "max_concurrent_requests",
})

#: `--dataset-name` choices of bench_serving's parser.
BENCH_DATASETS = ("sharegpt", "custom", "openai", "random", "random-ids", "generated-shared-prefix", "mmmu",
                  "image", "mooncake")

#: Flags `ServerArgs.add_cli_args` declares with `type=int`.
INT_FLAGS = frozenset({
    "attention-context-parallel-size", "attn-cp-size", "base-gpu-id", "chunked-prefill-size", "context-length",
    "cpu-offload-gb", "cuda-graph-bs", "cuda-graph-max-bs", "data-parallel-size", "debug-tensor-dump-layers",
    "decode-log-interval", "disaggregation-bootstrap-port", "disaggregation-decode-dp",
    "disaggregation-decode-polling-interval", "disaggregation-decode-tp", "disaggregation-prefill-pp",
    "dist-timeout", "dp-size", "ds-heavy-channel-num", "ds-heavy-token-num", "ds-sparse-decode-threshold",
    "dynamic-batch-tokenizer-batch-size", "ep", "ep-num-redundant-experts", "ep-size",
    "eplb-rebalance-layers-per-chunk", "eplb-rebalance-num-iterations", "expert-distribution-recorder-buffer-size",
    "expert-parallel-size", "gpu-id-step", "hicache-size", "kt-cpuinfer", "kt-gpu-prefill-token-threshold",
    "kt-max-deferred-experts-per-token", "kt-num-gpu-experts", "kt-numa-nodes", "kt-threadpool-count",
    "log-requests-level", "mamba-track-interval", "max-loaded-loras", "max-lora-chunk-size", "max-lora-rank",
    "max-loras-per-batch", "max-mamba-cache-size", "max-prefill-tokens", "max-queued-requests",
    "max-running-requests", "max-total-tokens", "mm-max-concurrent-calls", "mm-per-request-timeout",
    "moe-data-parallel-size", "moe-dense-tp-size", "moe-dp-size", "multi-item-scoring-delimiter", "nccl-port",
    "nnodes", "node-rank", "num-continuous-decode-steps", "num-reserved-decode-tokens", "numa-node",
    "offload-group-size", "offload-num-in-group", "offload-prefetch-step", "page-size",
    "piecewise-cuda-graph-max-tokens", "piecewise-cuda-graph-tokens", "pipeline-parallel-size", "port",
    "pp-async-batch-depth", "pp-max-micro-batch-size", "pp-size", "prefill-delayer-max-delay-passes",
    "prefill-max-requests", "priority-scheduling-preemption-threshold", "random-seed",
    "remote-instance-weight-loader-seed-instance-service-port", "scheduler-recv-interval", "sm-group-num",
    "speculative-eagle-topk", "speculative-ngram-branch-length", "speculative-ngram-capacity",
    "speculative-ngram-max-bfs-breadth", "speculative-ngram-max-match-window-size",
    "speculative-ngram-min-bfs-breadth", "speculative-ngram-min-match-window-size", "speculative-num-draft-tokens",
    "speculative-num-steps", "stream-interval", "tensor-parallel-size", "tokenizer-worker-num",
    "torch-compile-max-bs", "tp-size", "triton-attention-num-kv-splits", "triton-attention-split-tile-size",
})
