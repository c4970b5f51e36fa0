"""Hang detection by log progress, against the simulator's silent-stall, unhealthy and slow
warm-up modes launched the way kttune launches a server."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.errors import ServerLaunchError
from tuner.server import ServerHandle, find_free_port, start_server, stop_server, wait_ready
from tuner.server.logscan import PHASES, decisive_line, shows_progress, startup_phase
from tuner.sim.faults import parse_faults

HOST = "127.0.0.1"
# Above what the simulator takes to print its first line on a busy machine (its imports).
STALL_S = 4.0
FLAGS = ["--model-path", "path/to/Kimi-K2-Thinking/", "--kt-weight-path", "path/to/cpu-weights/",
         "--kt-cpuinfer", "56", "--kt-threadpool-count", "2", "--kt-num-gpu-experts", "200",
         "--mem-fraction-static", "0.98", "--chunked-prefill-size", "4096", "--max-running-requests", "37",
         "--max-total-tokens", "37000", "--tensor-parallel-size", "8", "--disable-shared-experts-fusion"]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    handles: list[ServerHandle] = []

    def start(fault: str, scale: float = 0.001) -> ServerHandle:
        port = find_free_port(HOST)
        argv = [sys.executable, "-m", "tuner.sim", "--sim-scenario", "kimi-k2-thinking-8xl20", "--sim-time-scale",
                str(scale), "--sim-seed", "1", "--sim-fault", fault, "--host", HOST, "--port", str(port), *FLAGS]
        h = start_server(argv, log_path=tmp_path / f"server-{len(handles)}.log", host=HOST, port=port,
                         env={"KTTUNE_SIM_FAULT": ""})
        handles.append(h)
        return h

    yield start
    for h in handles:
        stop_server(h, term_timeout_s=2, gpu_timeout_s=1)


@pytest.mark.parametrize(("fault", "phase"), [("stall_after=kv", "KV cache allocated"),
                                              ("stall_after=graphs", "CUDA graphs captured"),
                                              ("hang_at_start", "weights loading")])
def test_a_silent_stall_is_stalled_with_the_last_phase_long_before_the_start_timeout(sim, fault: str,
                                                                                      phase: str) -> None:
    h = sim(fault)
    t0 = time.monotonic()
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=120, stall_timeout_s=STALL_S, poll_s=0.1)
    assert err.value.reason == "stalled" and f"last phase: {phase}" in str(err.value)
    assert time.monotonic() - t0 < 30
    assert str(err.value).splitlines()[1].startswith("read ") and str(h.log_path) in str(err.value)


def test_http_up_but_never_healthy_is_unhealthy(sim) -> None:
    h = sim("unhealthy")
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=120, stall_timeout_s=STALL_S, poll_s=0.1)
    assert err.value.reason == "unhealthy" and "/health never 200" in str(err.value)


def test_a_slow_warm_up_that_logs_its_batches_is_waited_for(sim) -> None:
    # 8000 simulated seconds of warm-up = 8 s here, twice the stall timeout; a batch line every 0.01 s.
    h = sim("slow_warmup=8000")
    ready = wait_ready(h, timeout_s=120, stall_timeout_s=STALL_S, poll_s=0.1)
    text = h.log_path.read_text()
    assert "Decode batch" in text and "Uvicorn running" in text
    assert ready > 8.0


def test_without_a_stall_timeout_a_stall_waits_for_the_start_timeout(sim) -> None:
    h = sim("stall_after=kv")
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=4, poll_s=0.1)
    assert err.value.reason == "start_timeout" and "last phase: KV cache allocated" in str(err.value)


def test_phases_one_parser_per_line() -> None:
    assert startup_phase("[t TP0] Load weight end. elapsed=1 s, avail mem=40.00 GB, mem usage=5.00 GB.") == \
        "weights loaded"
    assert startup_phase("[t TP0] KV Cache is allocated. #tokens: 37000, KV size: 2.42 GB") == "KV cache allocated"
    assert startup_phase("[t] INFO:     Uvicorn running on http://127.0.0.1:1 (Press CTRL+C to quit)") == "HTTP up"
    assert startup_phase("[t] The server is fired up and ready to roll!") == "ready"
    assert startup_phase('[t] INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 503') is None
    assert shows_progress("Loading safetensors checkpoint shards:  40% Completed | 26/64 [00:31<00:43]")
    assert shows_progress("[t TP0] Decode batch, #running-req: 1, #token: 8, token usage: 0.00")
    assert not shows_progress('[t] INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 503')
    assert {startup_phase(line) for line in ("Init torch distributed begin.", "Capture cuda graph begin.")} <= set(PHASES)


@pytest.mark.parametrize(("text", "line"), [
    ("a\nlaunch_server.py: error: unrecognized arguments: --kt-amx-weight-path /x\nb",
     "launch_server.py: error: unrecognized arguments: --kt-amx-weight-path /x"),
    ("Fatal Python error: Segmentation fault\n[t] Rank 0 scheduler is dead. Please check if there are relevant logs.\n"
     "[t] Exit code: -11", "Fatal Python error: Segmentation fault"),
    ("[t TP0] Load weight end.\n[t TP0] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
     "[t TP0] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\nTypeError: bad operand",
     "TypeError: bad operand"),
    ("nothing here\n", None),
])
def test_the_decisive_line_is_the_one_the_classifier_names(text: str, line: str | None) -> None:
    assert decisive_line(text) == line


def test_new_sim_faults_parse() -> None:
    f = parse_faults("stall_after=kv,unhealthy,slow_warmup=30")
    assert f.stall_after == "kv" and f.unhealthy and f.slow_warmup_s == 30
    assert f.stalls_after("KV Cache is allocated. #tokens: 1") and not f.stalls_after("Load weight end.")
    with pytest.raises(ValueError, match="needs a phase"):
        parse_faults("stall_after=nowhere")


def test_a_launch_failure_names_the_decisive_line_first_then_the_log(tmp_path: Path) -> None:
    fake = Path(__file__).resolve().parents[1] / "fake_servers" / "fake_server.py"
    port = find_free_port(HOST)
    crash = "Fatal Python error: Segmentation fault\\nRank 0 scheduler is dead. Please check if there are relevant logs."
    h = start_server([sys.executable, str(fake), "--fail-with", crash, "--fail-after", "0", "--exit-rc", "1"],
                     log_path=tmp_path / "server.log", host=HOST, port=port)
    try:
        with pytest.raises(ServerLaunchError) as err:
            wait_ready(h, timeout_s=30, stall_timeout_s=STALL_S, poll_s=0.1)
    finally:
        stop_server(h, term_timeout_s=2, gpu_timeout_s=1)
    first, second = str(err.value).splitlines()[:2]
    assert err.value.reason == "scheduler_dead"
    assert first.endswith("Fatal Python error: Segmentation fault")
    assert "scheduler_dead" in second and second.endswith(f"read {h.log_path}")


def test_a_slow_weight_load_that_shows_progress_is_not_a_stall(sim) -> None:
    h = sim("slow_start=8000")  # 8 s of loading here, twice the stall timeout, a shard line every 0.8 s
    assert wait_ready(h, timeout_s=120, stall_timeout_s=STALL_S, poll_s=0.1) > 8.0
    assert "Loading safetensors checkpoint shards: 100% Completed" in h.log_path.read_text()
