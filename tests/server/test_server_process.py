"""Launch, readiness and teardown against fake servers (tests/fake_servers/fake_server.py)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from tuner.errors import ConfigError, ReadinessTimeout, ServerLaunchError, TeardownError
from tuner.machine.gpu import GpuInfo, gpu_processes, probe_gpus, used_bytes_total, visible_indices
from tuner.server import (
    OOM_REASONS,
    PID_FILE_NAME,
    ServerHandle,
    find_free_port,
    is_alive,
    kill_orphan,
    port_is_free,
    start_server,
    stop_server,
    wait_ready,
)

FAKE = Path(__file__).resolve().parents[1] / "fake_servers" / "fake_server.py"
HOST = "127.0.0.1"


class FakeGpu:
    """GpuMonitor double: lists ``pids`` on the GPU for the first ``busy_polls`` polls."""

    def __init__(self, pids: set[int], busy_polls: int, used_busy: int = 10 << 30, used_idle: int = 1 << 30) -> None:
        self.pids, self.busy_polls = pids, busy_polls
        self.used_busy, self.used_idle = used_busy, used_idle
        self.polls = 0

    def probe_gpus(self) -> list[GpuInfo]:
        return [GpuInfo(0, "Fake", 80 << 30, 70 << 30, self.used_idle)]

    def gpu_processes(self, indices: Sequence[int] | None = None) -> dict[int, int]:
        self.polls += 1
        return {pid: 1 << 30 for pid in self.pids} if self.polls <= self.busy_polls else {}

    def used_bytes_total(self, indices: Sequence[int] | None = None) -> int | None:
        return self.used_busy if self.polls <= self.busy_polls else self.used_idle

    def visible(self, spec: str | None) -> list[int] | None:
        return visible_indices(spec, self.probe_gpus())


@pytest.fixture
def launched(tmp_path: Path) -> Iterator[list[ServerHandle]]:
    """Collects handles; whatever a test leaves running is torn down afterwards."""
    handles: list[ServerHandle] = []
    yield handles
    for h in handles:
        try:
            stop_server(h, term_timeout_s=0.5, kill_timeout_s=2, port_timeout_s=2, gpu_timeout_s=1)
        except TeardownError:
            pass


def launch(tmp_path: Path, handles: list[ServerHandle], *flags: str, port: int | None = None) -> ServerHandle:
    port = port or find_free_port(HOST)
    argv = [sys.executable, str(FAKE), "--host", HOST, "--port", str(port), *flags]
    handle = start_server(argv, log_path=tmp_path / "server.log", host=HOST, port=port)
    handles.append(handle)
    return handle


def fake_pids(handle: ServerHandle, role: str, timeout_s: float = 5.0) -> int:
    """The PID a fake helper announced in the log (``FAKE <role>_pid=N``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(rf"FAKE {role}_pid=(\d+)", handle.log_path.read_text())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"{role} pid not logged")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ready_line_after_one_second(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--ready-after", "1", "--ready-line")
    t = wait_ready(h, timeout_s=10, poll_s=0.1)
    assert 0.9 <= t < 5
    assert (tmp_path / PID_FILE_NAME).exists()
    pid_info = json.loads((tmp_path / PID_FILE_NAME).read_text())
    assert pid_info["pid"] == h.pid == pid_info["pgid"] and pid_info["argv"] == list(h.argv)
    report = stop_server(h, term_timeout_s=5)
    assert report.signals_sent and report.leftover_pids == () and report.gpu_released is None
    assert not (tmp_path / PID_FILE_NAME).exists()
    assert not running(h.pid)


def test_oom_line_aborts_while_process_still_runs(tmp_path: Path, launched: list[ServerHandle]) -> None:
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.00 GiB free."
    h = launch(tmp_path, launched, "--fail-with", oom)  # logs the OOM, then hangs
    t0 = time.monotonic()
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=20, poll_s=0.1, settle_s=0.3)
    assert err.value.reason == "oom_weights" and err.value.reason in OOM_REASONS
    assert time.monotonic() - t0 < 5  # did not wait for the timeout
    assert h.proc.poll() is None  # wait_ready does not kill; the caller stops it
    stop_server(h, term_timeout_s=2)


def test_oom_crash_after_kv_allocation(tmp_path: Path, launched: list[ServerHandle]) -> None:
    oom = "Scheduler hit an exception: Traceback (most recent call last):\\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    h = launch(tmp_path, launched, "--load-lines", "--fail-with", oom, "--fail-after", "0", "--exit-rc", "1")
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=10, poll_s=0.1, settle_s=1)
    assert err.value.reason == "oom"
    assert "Tried to allocate 2.00 GiB" in str(err.value)


def test_silent_exit_rc3(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--exit-rc", "3")
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=10, poll_s=0.1)
    assert err.value.reason == "exited_rc_3"


def test_unrecognized_arguments(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--kt-amx-weight-path", "/w")  # argparse exits 2
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=10, poll_s=0.1)
    assert err.value.reason == "unrecognized_args"
    assert stop_server(h).returncode == 2


def test_hang_times_out(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--load-lines")
    with pytest.raises(ReadinessTimeout) as err:
        wait_ready(h, timeout_s=1.0, poll_s=0.2)
    assert err.value.reason == "start_timeout"


def test_health_only_readiness(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--http", "--uvicorn-line", "--ready-after", "1")
    t = wait_ready(h, timeout_s=10, poll_s=0.1)
    assert 0.9 <= t < 5
    assert is_alive(h)
    stop_server(h, term_timeout_s=5)
    assert not is_alive(h)


def test_health_before_http_up_line_is_no_gate(tmp_path: Path, launched: list[ServerHandle]) -> None:
    # /health answers 200 at once, but the log never showed Uvicorn/app startup.
    h = launch(tmp_path, launched, "--http", "--health-always")
    with pytest.raises(ReadinessTimeout):
        wait_ready(h, timeout_s=1.0, poll_s=0.1)


def test_child_ignoring_sigterm_is_killed(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--child-ignores-term", "--ignore-term")
    child = fake_pids(h, "child")
    report = stop_server(h, term_timeout_s=0.5, kill_timeout_s=5)
    assert any(s.startswith("SIGKILL") for s in report.signals_sent)
    assert child in report.killed_pids and h.pid in report.tree_pids
    assert not running(child) and not running(h.pid)
    assert report.leftover_pids == ()


def test_setsid_grandchild_is_killed(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--setsid-grandchild")
    grandchild = fake_pids(h, "grandchild")
    assert os.getsid(grandchild) != h.pid and os.getpgid(grandchild) != h.pid
    # Its parent has exited; the watchdog (the handle's process, a child subreaper) adopted it.
    assert psutil.Process(grandchild).ppid() == h.pid
    report = stop_server(h, term_timeout_s=0.5, kill_timeout_s=5)
    assert grandchild in report.tree_pids and f"SIGTERM:{grandchild}" in report.signals_sent  # outside the group
    # It ignores SIGTERM: the watchdog SIGKILLs it once the server is gone (or teardown does).
    assert not running(grandchild) and report.leftover_pids == ()


def test_port_freed_after_stop(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--http", "--uvicorn-line", "--ready-after", "0")
    wait_ready(h, timeout_s=10, poll_s=0.1)
    assert not port_is_free(HOST, h.port)
    stop_server(h, term_timeout_s=5, port_timeout_s=5)
    assert port_is_free(HOST, h.port)


def test_busy_port_fails_before_launch(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(HOST, port)
        with pytest.raises(ServerLaunchError) as err:
            start_server([sys.executable, str(FAKE)], log_path=tmp_path / "s.log", host=HOST, port=port)
    assert err.value.reason == "port_in_use"


def test_port_held_by_a_stranger_is_reported_not_awaited(tmp_path: Path, launched: list[ServerHandle]) -> None:
    with socket.socket() as sock:  # this test process is older than the launch: a stranger
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        argv = [sys.executable, str(FAKE)]
        h = start_server(argv, log_path=tmp_path / "s.log", host=HOST, port=port, check_port=False)
        launched.append(h)
        report = stop_server(h, term_timeout_s=2, port_timeout_s=20)
    assert report.port_released is False and report.duration_s < 10


def test_argv_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        start_server("python -m sglang.launch_server", log_path=tmp_path / "s.log", host=HOST, port=1)


def test_orphan_from_pid_file_is_killed(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--child-ignores-term")
    child = fake_pids(h, "child")
    pid_file = tmp_path / PID_FILE_NAME
    # A pid file whose create_time does not match must not kill anything.
    bogus = tmp_path / "bogus.pid"
    bogus.write_text(json.dumps({**json.loads(pid_file.read_text()), "create_time": 1.0, "token": "x"}))
    assert kill_orphan(bogus, term_timeout_s=0.5) is False
    assert running(h.pid) and running(child)
    # The real one kills the launcher and its TERM-proof child, then removes the file.
    assert kill_orphan(pid_file, term_timeout_s=0.5, kill_timeout_s=5) is True
    h.proc.wait(timeout=5)
    assert not running(child)
    assert not pid_file.exists()


def test_kt_shm_files_of_the_tree_are_removed(tmp_path: Path, launched: list[ServerHandle]) -> None:
    name = f"kt_buf_kttune_test_{uuid.uuid4().hex[:8]}"
    h = launch(tmp_path, launched, "--shm", name)
    deadline = time.monotonic() + 30
    while "FAKE shm=" not in h.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path("/dev/shm", name).exists()
    # Held open here as well: a teardown running meanwhile (another test of this run, another
    # run on this host) must not take it for an orphan and remove it first; ours removes it as
    # the tree's own.
    with Path("/dev/shm", name).open("rb"):
        report = stop_server(h, term_timeout_s=2)
    assert f"/dev/shm/{name}" in report.shm_removed
    assert not Path("/dev/shm", name).exists()


def test_gpu_release_is_awaited(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched)
    gpu = FakeGpu({h.pid}, busy_polls=3)
    report = stop_server(h, term_timeout_s=2, gpu=gpu, baseline_gpu_used=1 << 30, gpu_timeout_s=5)
    assert report.gpu_released is True and gpu.polls > 3


def test_stuck_gpu_memory_raises_naming_pids(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched)
    gpu = FakeGpu({h.pid}, busy_polls=10**6)
    with pytest.raises(TeardownError) as err:
        stop_server(h, term_timeout_s=2, gpu=gpu, baseline_gpu_used=1 << 30, gpu_timeout_s=0.5)
    assert str(h.pid) in str(err.value) and "baseline" in str(err.value)
    assert err.value.report.gpu_released is False  # type: ignore[attr-defined]


def test_gpu_functions_with_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NVML adapter converts device and process records (bytes names, None usage)."""
    from types import SimpleNamespace

    class NVMLError(Exception):
        pass

    def processes(handle: int) -> list[SimpleNamespace]:
        if handle == 1:
            raise NVMLError("not supported")
        return [SimpleNamespace(pid=10, usedGpuMemory=3 << 30), SimpleNamespace(pid=11, usedGpuMemory=None)]

    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100" if h == 0 else "NVIDIA L20",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 << 30, free=(80 - 4 * (h + 1)) << 30, used=(4 * (h + 1)) << 30),
        nvmlDeviceGetComputeRunningProcesses=processes,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = probe_gpus()
    assert [g.name for g in gpus] == ["NVIDIA H100", "NVIDIA L20"]
    assert gpus[1] == GpuInfo(1, "NVIDIA L20", 80 << 30, 72 << 30, 8 << 30)
    assert gpu_processes() == {10: 3 << 30, 11: 0}
    assert used_bytes_total() == 12 << 30


def test_gpu_functions_without_nvml_are_empty() -> None:
    # This machine has no NVIDIA driver; on a GPU host the values are real.
    gpus = probe_gpus()
    if gpus:
        pytest.skip("NVML present")
    assert gpu_processes() == {} and used_bytes_total() is None


def test_find_free_port_is_bindable() -> None:
    port = find_free_port(HOST)
    assert port_is_free(HOST, port)
    with socket.socket() as sock:
        sock.bind((HOST, port))


def test_stop_is_idempotent(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched)
    stop_server(h, term_timeout_s=2)
    again = stop_server(h, term_timeout_s=2)
    assert again.signals_sent == () and again.returncode is not None


def _tuner_with_server(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], int]:
    """A stand-in tuner: a process that starts a fake server (with ``flags``) and sleeps."""
    port = find_free_port(HOST)
    argv = [sys.executable, str(FAKE), "--host", HOST, "--port", str(port), *flags]
    code = ("import sys, time\nfrom pathlib import Path\nfrom tuner.server import start_server\n"
            f"h = start_server({argv!r}, log_path=Path({str(tmp_path / 's.log')!r}), host={HOST!r}, port={port})\n"
            "print(h.pid, flush=True)\ntime.sleep(60)\n")
    tuner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert tuner.stdout is not None
    return tuner, int(tuner.stdout.readline())


def _tree_of(pid: int, token: str) -> set[int]:
    """Live processes of a launch: the watchdog's descendants plus any carrying its token."""
    from tuner.server import TOKEN_ENV

    out = set()
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and (p.pid == pid or p.environ().get(TOKEN_ENV) == token):
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


def test_a_sigkilled_tuner_leaves_no_process_of_the_tree(tmp_path: Path) -> None:
    """SIGKILL of the tuner (no teardown at all): the watchdog kills the server, its TERM-proof
    child and a grandchild that escaped into its own session, then itself."""
    tuner, watchdog = _tuner_with_server(tmp_path, "--child-ignores-term", "--setsid-grandchild", "--ignore-term")
    deadline = time.monotonic() + 10
    while not psutil.Process(watchdog).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    server = psutil.Process(watchdog).children()[0]
    assert "fake_server.py" in " ".join(server.cmdline())  # the command runs under the watchdog
    token = json.loads((tmp_path / PID_FILE_NAME).read_text())["token"]
    child, grandchild = 0, 0
    deadline = time.monotonic() + 10
    while not (child and grandchild) and time.monotonic() < deadline:
        text = (tmp_path / "s.log").read_text()
        child = int(m.group(1)) if (m := re.search(r"FAKE child_pid=(\d+)", text)) else 0
        grandchild = int(m.group(1)) if (m := re.search(r"FAKE grandchild_pid=(\d+)", text)) else 0
        time.sleep(0.05)
    assert {watchdog, server.pid, child, grandchild} <= _tree_of(watchdog, token)
    tuner.kill()
    tuner.wait()
    deadline = time.monotonic() + 10
    while _tree_of(watchdog, token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tree_of(watchdog, token) == set(), "processes outlived their SIGKILLed tuner"


def test_the_watchdog_passes_on_the_commands_exit_status(tmp_path: Path, launched: list[ServerHandle]) -> None:
    h = launch(tmp_path, launched, "--exit-rc", "3")
    assert h.proc.wait(timeout=10) == 3
    argv = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    h2 = start_server(argv, log_path=tmp_path / "segv.log", host=HOST, port=find_free_port(HOST))
    launched.append(h2)
    assert h2.proc.wait(timeout=10) == -11


def test_a_command_the_watchdog_cannot_exec_is_exec_failed(tmp_path: Path, launched: list[ServerHandle]) -> None:
    bogus = tmp_path / "not-a-program"
    bogus.write_bytes(b"\x00\x01garbage")
    bogus.chmod(0o755)
    h = start_server([str(bogus)], log_path=tmp_path / "s.log", host=HOST, port=find_free_port(HOST))
    launched.append(h)
    with pytest.raises(ServerLaunchError) as err:
        wait_ready(h, timeout_s=10, poll_s=0.1)
    assert err.value.reason == "exec_failed" and str(err.value).startswith("kttune watchdog: cannot run")
    assert h.proc.returncode == 127
