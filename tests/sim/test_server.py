"""The simulated server looks like `python -m sglang.launch_server` from outside: log lines, exit
codes, endpoints, payloads and the process tree."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tuner.sim.args import ConfigFileError, UsageError, parse_args, to_sim_config
from tuner.sim.faults import Faults, parse_faults

REPO = Path(__file__).resolve().parents[2]
SCENARIO = "kimi-k2-thinking-8xl20"
SEED_FLAGS = [
    "--model-path", "path/to/Kimi-K2-Thinking/", "--kt-weight-path", "path/to/cpu-weights/",
    "--kt-cpuinfer", "56", "--kt-threadpool-count", "2", "--kt-num-gpu-experts", "200",
    "--kt-method", "AMXINT4", "--attention-backend", "flashinfer", "--trust-remote-code",
    "--mem-fraction-static", "0.98", "--chunked-prefill-size", "4096", "--max-running-requests", "37",
    "--max-total-tokens", "37000", "--enable-mixed-chunk", "--tensor-parallel-size", "8",
    "--enable-p2p-check", "--disable-shared-experts-fusion", "--disable-radix-cache",
]
READY = "The server is fired up and ready to roll!"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_flag(flags: list[str], name: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


class Sim:
    """`python -m tuner.sim ...` in its own session, output drained by a thread."""

    def __init__(self, *extra: str, scale: float = 0.01, fault: str = "", flags: list[str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        argv = [sys.executable, "-m", "tuner.sim", "--sim-scenario", SCENARIO, "--sim-time-scale", str(scale),
                "--sim-seed", "7", "--host", "127.0.0.1", "--port", str(self.port), *(flags or SEED_FLAGS), *extra]
        if fault:
            argv += ["--sim-fault", fault]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KTTUNE_SIM_")}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._done = False
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def wait_for(self, needle: str, timeout: float = 20.0) -> float:
        """Monotonic time the first line containing needle was read; fails on timeout or exit."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, line in self.lines:
                    if needle in line:
                        return t
                left = end - time.monotonic()
                if left <= 0 or self._done:
                    raise AssertionError(f"{needle!r} not seen (rc={self.proc.poll()}):\n{self.text}")
                self._cond.wait(min(left, 0.2))

    def wait_exit(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        with self._cond:
            self._cond.wait_for(lambda: self._done, timeout=5)
        return rc

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def sims() -> Any:
    started: list[Sim] = []

    def start(*extra: str, **kw: Any) -> Sim:
        sim = Sim(*extra, **kw)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        try:
            os.killpg(sim.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sim.proc.wait(timeout=10)


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sse_events(raw: bytes) -> list[Any]:
    events = [chunk[len("data: "):] for chunk in raw.decode().split("\n\n") if chunk.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def children_gone(pids: list[int], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------- end to end


def test_serves_streams_and_drains_on_sigterm(sims: Any) -> None:
    sim = sims("--some-future-flag", "3", scale=0.005)
    sim.wait_for(READY)
    out = sim.text
    assert "unrecognized arguments ignored" in out and "--some-future-flag 3" in out
    assert "Using kt_num_gpu_experts=200 per layer, total GPU experts: 12000" in out
    assert "server_args=ServerArgs(model_path='path/to/Kimi-K2-Thinking/'" in out
    order = [out.index(s) for s in ("Load weight begin", "Load weight end", "KV Cache is allocated",
                                    "Uvicorn running on http://127.0.0.1", READY)]
    assert order == sorted(order)
    children = [c.pid for c in psutil.Process(sim.proc.pid).children()]
    assert children, "a scheduler child process must exist while serving"

    status, raw = http(sim.url("/generate"), {"text": "hello there general", "stream": True,
                                              "sampling_params": {"max_new_tokens": 12, "temperature": 0.0,
                                                                  "ignore_eos": True}})
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    prev_text, prev_n = "", 0
    for ev in events[:-1]:
        assert ev["text"].startswith(prev_text) and len(ev["text"]) > len(prev_text)  # cumulative, non-empty
        assert ev["meta_info"]["completion_tokens"] > prev_n
        assert ev["meta_info"]["prompt_tokens"] == 3
        prev_text, prev_n = ev["text"], ev["meta_info"]["completion_tokens"]
    assert prev_n == 12 and len(prev_text.split()) == 12

    assert http(sim.url("/health"))[0] == 200
    assert http(sim.url("/ping"))[0] == 200
    models = json.loads(http(sim.url("/v1/models"))[1])
    assert models["data"][0]["id"] == "path/to/Kimi-K2-Thinking/"
    info = json.loads(http(sim.url("/server_info"))[1])
    mem = info["internal_states"][0]["memory_usage"]
    assert mem["token_capacity"] == 37000 and mem["weight"] > 30 and mem["kvcache"] > 2
    assert info["max_total_num_tokens"] == 37000 and info["tp_size"] == 8
    assert json.loads(http(sim.url("/get_server_info"))[1])["kt_num_gpu_experts"] == 200
    assert json.loads(http(sim.url("/model_info"))[1])["is_generation"] is True
    status, raw = http(sim.url("/v1/completions"), {"model": "m", "prompt": "a b c d", "max_tokens": 5})
    body = json.loads(raw)
    assert status == 200 and body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    status, raw = http(sim.url("/v1/completions"), {"prompt": "a b", "max_tokens": 4, "stream": True})
    deltas = [e["choices"][0]["text"] for e in sse_events(raw)[:-1]]
    assert status == 200 and len(deltas) == 4 and all(deltas)

    os.kill(sim.proc.pid, signal.SIGTERM)  # the parent only: it must take its children down
    rc = sim.wait_exit(timeout=15)
    assert rc == -signal.SIGKILL  # the real launcher ends its graceful exit with kill_process_tree(self)
    assert "Gracefully exiting... Remaining number of requests 0." in sim.text
    assert children_gone(children)


def test_infeasible_config_dies_with_oom_before_binding(sims: Any) -> None:
    sim = sims(scale=0.002, flags=with_flag(SEED_FLAGS, "--kt-num-gpu-experts", "300"))
    rc = sim.wait_exit()
    out = sim.text
    assert rc != 0
    for needle in ("CUDA out of memory. Tried to allocate", "Scheduler hit an exception:",
                   "Received sigquit from a child process. It usually means the child failed."):
        assert needle in out
    assert "Uvicorn running" not in out and READY not in out


def test_chunked_prefill_minus_one_with_kt_fails(sims: Any) -> None:
    sim = sims(scale=0.002, flags=with_flag(SEED_FLAGS, "--chunked-prefill-size", "-1"))
    assert sim.wait_exit() != 0
    assert "Scheduler hit an exception:" in sim.text and "Uvicorn running" not in sim.text


def test_port_in_use_fails_only_after_the_full_load(sims: Any) -> None:
    holder = socket.socket()  # bound, not listening, no SO_REUSEADDR: binds fail, connects are refused
    holder.bind(("127.0.0.1", 0))
    try:
        sim = sims(scale=0.002, port=holder.getsockname()[1])
        rc = sim.wait_exit()
    finally:
        holder.close()
    out = sim.text
    bind = f"[Errno 98] error while attempting to bind on address ('127.0.0.1', {sim.port}): address already in use"
    assert rc != 0 and bind in out
    assert out.index("max_total_num_tokens=37000") < out.index(bind)
    assert "Initialization failed. warmup error:" in out and READY not in out


def test_removed_kt_amx_flag_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "tuner.sim", "--sim-scenario", SCENARIO, *SEED_FLAGS,
                           "--kt-amx-weight-path", "x"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "error: unrecognized arguments: --kt-amx-weight-path x" in proc.stderr


# ------------------------------------------------------------------------- faults


def test_fault_crash_at_start(sims: Any) -> None:
    sim = sims(scale=0.002, fault="crash_at_start")
    assert sim.wait_exit() == 1
    assert "Rank 0 scheduler is dead. Please check if there are relevant logs." in sim.text
    assert "Exit code: -11" in sim.text and "Uvicorn running" not in sim.text


def test_fault_hang_at_start_never_ready_and_dies_on_sigterm(sims: Any) -> None:
    sim = sims(scale=0.002, fault="hang_at_start")
    sim.wait_for("Load weight begin")
    children = [c.pid for c in psutil.Process(sim.proc.pid).children()]
    time.sleep(1.5)  # several times the whole scaled start-up
    assert sim.proc.poll() is None and "Uvicorn running" not in sim.text
    os.kill(sim.proc.pid, signal.SIGTERM)
    assert sim.wait_exit() == -signal.SIGTERM
    assert children_gone(children)


def test_fault_slow_start_adds_scaled_load_time(sims: Any) -> None:
    sim = sims(scale=0.002, fault="slow_start=600")  # +1.2 s
    begin = sim.wait_for("Load weight begin")
    end = sim.wait_for("Load weight end")
    assert end - begin >= 1.2
    sim.wait_for(READY)


def test_fault_crash_after_n_requests(sims: Any) -> None:
    sim = sims(scale=0.002, fault="crash_after=1")
    sim.wait_for(READY)
    body = {"text": "x y", "sampling_params": {"max_new_tokens": 2}}
    assert http(sim.url("/generate"), body)[0] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http(sim.url("/generate"), body)
    assert sim.wait_exit() != 0
    assert "Scheduler hit an exception:" in sim.text and "It usually means one child failed." in sim.text


def test_fault_port_in_use(sims: Any) -> None:
    sim = sims(scale=0.002, fault="port_in_use")
    assert sim.wait_exit() != 0
    assert "[Errno 98] error while attempting to bind on address" in sim.text and READY not in sim.text


def test_fault_garbage_output(sims: Any) -> None:
    sim = sims(scale=0.002, fault="garbage_output")
    sim.wait_for(READY)
    status, raw = http(sim.url("/generate"), {"text": "x y z", "sampling_params": {"max_new_tokens": 8}})
    words = json.loads(raw)["text"].split()
    assert status == 200 and len(words) == 8 and len(set(words)) == 1
    sim.proc.send_signal(signal.SIGINT)  # uvicorn stops, children are killed, exit 0
    assert sim.wait_exit() == 0 and "Finished server process" in sim.text


# ------------------------------------------------------------------------- parsing


def test_config_file_merges_like_sglang(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kt-num-gpu-experts: 120\nenable-mixed-chunk: true\ndisable-radix-cache: false\n"
                   "kt-numa-nodes: [0, 1]\ntp-size: 8\n")
    args = parse_args(["--sim-scenario", SCENARIO, "--model-path", "m", "--config", str(cfg),
                       "--kt-num-gpu-experts", "150"])
    s = args.server
    assert s["kt_num_gpu_experts"] == 150  # CLI wins
    assert s["enable_mixed_chunk"] is True and s["disable_radix_cache"] is False
    assert s["kt_numa_nodes"] == [0, 1] and s["tp_size"] == 8
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(ConfigFileError):
        parse_args(["--sim-scenario", SCENARIO, "--model-path", "m", "--config", str(bad)])


def test_parse_args_maps_flags_and_sim_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTTUNE_SIM_SCENARIO", SCENARIO)
    monkeypatch.setenv("KTTUNE_SIM_TIME_SCALE", "0.5")
    monkeypatch.setenv("KTTUNE_SIM_FAULT", "crash_after=3,garbage_output")
    args = parse_args([*SEED_FLAGS, "--sim-noise", "0", "--unknown-x"])
    assert args.sim.scenario == SCENARIO and args.sim.time_scale == 0.5 and args.sim.noise == 0.0
    assert args.sim.faults == Faults(crash_after=3, garbage_output=True)
    assert args.unknown == ("--unknown-x",)
    cfg = to_sim_config(args)
    assert (cfg.tp, cfg.kt_num_gpu_experts, cfg.kt_cpuinfer, cfg.chunked_prefill_size) == (8, 200, 56, 4096)
    assert cfg.enable_mixed_chunk and cfg.kt_max_deferred_experts_per_token == 0
    with pytest.raises(UsageError, match="unrecognized arguments: --kt-amx-method"):
        parse_args([*SEED_FLAGS, "--kt-amx-method", "x"])
    with pytest.raises(UsageError, match="--sim-fault"):
        parse_args([*SEED_FLAGS, "--sim-fault", "explode"])


def test_parse_faults() -> None:
    assert parse_faults("") == Faults()
    f = parse_faults("crash_at_start, slow_start=2.5,port_in_use")
    assert f.crash_at_start and f.slow_start_s == 2.5 and f.port_in_use
    for bad in ("slow_start", "crash_after=x", "crash_at_start=1", "nope"):
        with pytest.raises(ValueError):
            parse_faults(bad)
    assert re.search("crash_after", str(pytest.raises(ValueError, parse_faults, "crash_after=-1").value))
