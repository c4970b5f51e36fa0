"""Log classification on realistic SGLang / kt-kernel log snippets, in the formats sglang-kt 0.7.2 prints."""
from __future__ import annotations

import pytest

from tuner.server.logscan import (
    ABORT_REASONS,
    READY_LINE,
    classify_failure,
    find_failures,
    first_failure,
    line_abort_reason,
    parse_memory_lines,
    runtime_oom,
    worst_memory_figures,
)

ARGS = "[2025-11-04 05:20:00] server_args=ServerArgs(model_path='/m', watchdog_timeout=300, mem_fraction_static=0.98, kt_num_gpu_experts=200)"
LOAD_OK = """\
[2025-11-04 05:27:13 TP0] Load weight begin. avail mem=46.91 GB
[2025-11-04 05:27:13 TP1] Load weight begin. avail mem=46.91 GB
[2025-11-04 05:29:13 TP1] Load weight end. elapsed=120.2 s, type=DeepseekV3ForCausalLM, avail mem=4.97 GB, mem usage=41.94 GB.
[2025-11-04 05:29:14 TP0] Load weight end. elapsed=121.0 s, type=DeepseekV3ForCausalLM, avail mem=4.80 GB, mem usage=42.11 GB.
"""
KV_OK = """\
[2025-11-04 05:29:20 TP0] KV Cache is allocated. #tokens: 37000, KV size: 2.42 GB
[2025-11-04 05:29:20 TP1] KV Cache is allocated. #tokens: 37000, KV size: 2.42 GB
[2025-11-04 05:29:20 TP0] Memory pool end. avail mem=2.31 GB
[2025-11-04 05:29:21 TP0] Capture cuda graph begin. This can take up to several minutes. avail mem=2.30 GB
[2025-11-04 05:29:40 TP0] Capture cuda graph end. Time elapsed: 19.12 s. mem usage=0.61 GB. avail mem=1.69 GB.
[2025-11-04 05:29:40 TP1] Capture cuda graph end. Time elapsed: 19.20 s. mem usage=0.58 GB. avail mem=1.75 GB.
[2025-11-04 05:29:41 TP0] max_total_num_tokens=37000, chunked_prefill_size=4096, max_prefill_tokens=16384, max_running_requests=37, context_len=262144, available_gpu_mem=1.69 GB
[2025-11-04 05:29:42] INFO:     Started server process [1234]
[2025-11-04 05:29:42] INFO:     Application startup complete.
[2025-11-04 05:29:42] INFO:     Uvicorn running on http://0.0.0.0:60000 (Press CTRL+C to quit)
"""
OOM_TRACE = """\
[2025-11-04 05:28:00 TP0] Scheduler hit an exception: Traceback (most recent call last):
  File "/sglang/srt/managers/scheduler.py", line 2900, in run_scheduler_process
    scheduler = Scheduler(server_args, port_args, gpu_id, tp_rank)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 47.38 GiB of which 1.12 GiB is free.
[2025-11-04 05:28:00] Received sigquit from a child process. It usually means the child failed.
"""


def test_ready_and_clean_startup_has_no_failure() -> None:
    text = "\n".join([ARGS, LOAD_OK, KV_OK, f"[2025-11-04 05:30:00] {READY_LINE}"])
    assert classify_failure(text) is None
    assert find_failures(text) == []


def test_oom_during_weight_load() -> None:
    text = ARGS + "\n[2025-11-04 05:27:13 TP0] Load weight begin. avail mem=46.91 GB\n" + OOM_TRACE
    assert classify_failure(text) == "oom_weights"
    match = first_failure(text)
    assert match is not None and "Tried to allocate 2.00 GiB" in match.line


def test_oom_while_one_rank_still_loads_is_weights() -> None:
    text = (
        "[t TP0] Load weight begin. avail mem=46.91 GB\n[t TP1] Load weight begin. avail mem=46.91 GB\n"
        "[t TP0] Load weight end. elapsed=1 s, avail mem=5.00 GB, mem usage=41.00 GB.\n" + OOM_TRACE
    )
    assert classify_failure(text) == "oom_weights"


def test_oom_at_kv_allocation_after_all_ranks_loaded() -> None:
    assert classify_failure(ARGS + "\n" + LOAD_OK + OOM_TRACE) == "oom_kv_alloc"


def test_runtime_oom_after_ready() -> None:
    text = LOAD_OK + KV_OK + f"[t] {READY_LINE}\n" + OOM_TRACE
    assert classify_failure(text) == "oom"


def test_cuda_graph_failure_beats_its_oom() -> None:
    text = LOAD_OK + KV_OK.split("[2025-11-04 05:29:40")[0] + (
        "[t TP0] Scheduler hit an exception: Traceback (most recent call last):\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 MiB.\n"
        "Exception: Capture cuda graph failed: CUDA out of memory. Tried to allocate 64.00 MiB.\n"
        "Possible solutions:\n1. set --mem-fraction-static to a smaller value (e.g., 0.8 or 0.7)\n"
    )
    assert classify_failure(text) == "cuda_graph_failed"


@pytest.mark.parametrize(
    ("snippet", "reason"),
    [
        ("launch_server.py: error: unrecognized arguments: --kt-amx-weight-path /w", "unrecognized_args"),
        ("launch_server.py: error: argument --kt-method: invalid choice: 'AMX'", "invalid_args"),
        (
            "[t] ERROR:    [Errno 98] error while attempting to bind on address ('0.0.0.0', 60000): address already in use",
            "port_in_use",
        ),
        ("[t TP0] Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.", "kt_not_enabled"),
        (
            "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static. "
            "Current value: self.server_args.mem_fraction_static=0.5",
            "kv_not_enough_memory",
        ),
        ("[t TP0] Watchdog timeout (self.watchdog_timeout=300)", "watchdog_timeout"),
        ("[t] Initialization failed. warmup error: Traceback (most recent call last):", "warmup_failed"),
        ("[t] Rank 0 scheduler is dead. Please check if there are relevant logs.\n[t] Exit code: -11", "scheduler_dead"),
        ("[t] Received sigquit from a child process. It usually means the child failed.", "child_failed"),
        ("Traceback (most recent call last):\nTypeError: unsupported operand", "python_exception"),
        ("[t TP0] KV cache pool is full. Retract requests. #retracted_reqs: 3, #new_token_ratio: 0.42", "runtime_kv_full"),
        ("[t TP0] max_total_tokens=400000 is larger than the profiled value 120000. Use the profiled value instead.", "kv_clipped"),
    ],
)
def test_reason_strings(snippet: str, reason: str) -> None:
    assert classify_failure(ARGS + "\n" + snippet) == reason


def test_server_args_dump_alone_is_not_a_failure() -> None:
    # watchdog_timeout=300 and mem_fraction_static appear in every startup log
    assert classify_failure(ARGS) is None


def test_warnings_do_not_mask_failures_and_can_be_excluded() -> None:
    warn = "[t TP0] KV cache pool is full. Retract requests. #retracted_reqs: 1\n"
    assert classify_failure(warn + "[t TP0] Watchdog timeout (self.watchdog_timeout=300)\n") == "watchdog_timeout"
    assert classify_failure(warn, include_warnings=False) is None


def test_kt_not_enabled_explains_the_following_oom() -> None:
    text = "[t TP0] Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.\n" + OOM_TRACE
    assert classify_failure(text) == "kt_not_enabled"


def test_line_abort_reason() -> None:
    assert line_abort_reason("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "oom"
    assert line_abort_reason("Traceback (most recent call last):") is None
    assert line_abort_reason("[t TP0] KV cache pool is full. Retract requests.") is None
    assert line_abort_reason("[t] Rank 0 scheduler is dead.") in ABORT_REASONS


def test_parse_memory_lines_mla_tp2() -> None:
    clip = "[t TP0] max_total_tokens=37000 is larger than the profiled value 36000. Use the profiled value instead.\n"
    mem = parse_memory_lines(LOAD_OK + clip + KV_OK)
    assert mem["weight_mem_gib_by_rank"] == {0: 42.11, 1: 41.94}
    assert mem["weight_mem_gib"] == 42.11
    assert mem["weight_avail_gib"] == 4.80
    assert mem["kv_tokens"] == 37000 and mem["kv_size_gib"] == 2.42
    assert mem["kv_clip_requested_tokens"] == 37000 and mem["kv_clip_profiled_tokens"] == 36000
    assert mem["pool_avail_gib"] == 2.31
    assert mem["cuda_graph_mem_gib"] == 0.61 and mem["cuda_graph_avail_gib"] == 1.69
    assert mem["max_total_num_tokens"] == 37000
    assert mem["chunked_prefill_size"] == 4096
    assert mem["max_prefill_tokens"] == 16384
    assert mem["max_running_requests"] == 37
    assert mem["context_len"] == 262144
    assert mem["available_gpu_mem_gib"] == 1.69


def test_parse_memory_lines_gqa_and_old_order() -> None:
    text = (
        "[t] Load weight end. type=Qwen3MoeForCausalLM, dtype=torch.bfloat16, mem usage=6.21 GB, avail mem=15.20 GB\n"
        "[t] KV Cache is allocated. #tokens: 123456, K size: 2.12 GB, V size: 2.12 GB\n"
    )
    mem = parse_memory_lines(text)
    assert mem["weight_mem_gib"] == 6.21 and mem["weight_avail_gib"] == 15.20
    assert mem["kv_tokens"] == 123456 and mem["kv_size_gib"] == pytest.approx(4.24)
    assert "max_total_num_tokens" not in mem
    assert parse_memory_lines("") == {}


def test_worst_memory_figures_take_the_worst_rank() -> None:
    clip = "[t TP0] max_total_tokens=37000 is larger than the profiled value 36000. Use the profiled value instead.\n"
    mem = worst_memory_figures(ARGS + "\n" + LOAD_OK + clip + KV_OK)
    assert mem["weight_begin_avail_gib"] == 46.91
    assert mem["weight_mem_gib"] == 42.11 and mem["weight_avail_gib"] == 4.80
    assert mem["kv_tokens"] == 37000 and mem["kv_size_gib"] == 2.42
    assert mem["kv_clip_requested_tokens"] == 37000 and mem["kv_clip_profiled_tokens"] == 36000
    assert mem["cuda_graph_mem_gib"] == 0.61 and mem["available_gpu_mem_gib"] == 1.69
    assert mem["chunked_prefill_size"] == 4096 and mem["max_running_requests"] == 37
    assert mem["cuda_oom"] is False and mem["kv_not_enough_memory"] is False
    assert worst_memory_figures("") == {"cuda_oom": False, "kv_not_enough_memory": False}


def test_runtime_oom_only_after_the_server_is_ready() -> None:
    assert runtime_oom(LOAD_OK + KV_OK + f"[t] {READY_LINE}\n" + OOM_TRACE)
    assert not runtime_oom(LOAD_OK + OOM_TRACE)


def test_the_silent_placement_fallback_is_found_and_is_no_start_up_failure() -> None:
    from tuner.server.logscan import FALLBACK_REASONS, silent_fallback

    log = ("[2026-12-02 10:00:01 TP0] Using frequency-based strategy WITHOUT activation frequency data "
           "(uniform distribution fallback)\n" + "The server is fired up and ready to roll!\n")
    match = silent_fallback(log)
    assert match is not None and match.reason in FALLBACK_REASONS and match.line_no == 1
    assert classify_failure(log) is None                   # the server runs: readiness does not fail
    assert silent_fallback("Using frequency-based strategy with activation frequency data\n") is None
UPSTREAM_STARTUP = """\
[2026-10-01 10:00:00 TP0] Load weight begin. avail mem=46.91 GB
[2026-10-01 10:02:00 TP0] Load weight end. elapsed=120.00 s, type=DeepseekV3ForCausalLM, fp8, avail mem=4.80 GB, mem usage=42.11 GB.
[2026-10-01 10:02:01 TP0] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 37000, KV size: 2.42 GB
[2026-10-01 10:02:02 TP0] Capture target decode CUDA graph begin. backend=full, num_tokens_per_req=1, avail mem=2.30 GB
[2026-10-01 10:02:20 TP0] Capture target decode CUDA graph end. bs=[1, 2, 4, 8], elapsed=18.00 s, mem usage=0.51 GB, avail mem=1.79 GB.
[2026-10-01 10:02:21 TP0] Capture target prefill CUDA graph end. elapsed=1.00 s, mem usage=0.10 GB, avail mem=1.69 GB.
[2026-10-01 10:02:22 TP0] max_total_num_tokens=37000, chunked_prefill_size=4096, max_prefill_tokens=16384, max_running_requests=37, context_len=262144, available_gpu_mem=1.69 GB
"""


def test_upstream_lines_are_read_and_its_graphs_add_up() -> None:
    figures = parse_memory_lines(UPSTREAM_STARTUP)
    assert figures["kv_tokens"] == 37000 and figures["kv_size_gib"] == 2.42
    assert figures["cuda_graph_mem_gib"] == pytest.approx(0.61) and figures["cuda_graph_avail_gib"] == 1.69
    assert figures["weight_mem_gib"] == 42.11 and figures["weight_begin_avail_gib"] == 46.91
    worst = worst_memory_figures(UPSTREAM_STARTUP)
    assert worst["cuda_graph_mem_gib"] == pytest.approx(0.61) and worst["kv_tokens"] == 37000


def test_labelled_and_post_capture_kv_lines_and_upstream_graph_failure() -> None:
    line = "[x TP0] SWA KV Cache VA upper bound. dtype: torch.float8_e4m3fn, #tokens: 9000, K size: 1.00 GB, V size: 1.00 GB"
    assert parse_memory_lines(line)["kv_tokens"] == 9000 and parse_memory_lines(line)["kv_size_gib"] == 2.0
    text = LOAD_OK + "[x TP0] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 10, KV size: 0.01 GB\n" \
        "[x TP0] Capture prefill CUDA graph failed: CUDA out of memory. Tried to allocate 1 GiB\n"
    assert classify_failure(text) == "cuda_graph_failed"
    oom = LOAD_OK + "[x TP0] KV Cache VA upper bound. dtype: bf16, #tokens: 10, KV size: 0.01 GB\n" + OOM_TRACE
    assert classify_failure(oom) == "oom"  # after the KV pool: not a KV-allocation OOM
