"""Fault injection through `kttune run` on the simulator (benchmarks/fault_matrix.py drives it).

Every row of the fault matrix must end with its stable reason on the trial, the study must
reach its budget, no process may be left behind, and a SIGKILLed tuner must lose nothing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import pytest

from benchmarks.fault_matrix import (
    START_TIMEOUT_S,
    STUDY,
    CaseResult,
    Fault,
    cases,
    marked_processes,
    prepare,
    run_case,
    table,
)
from tests.conftest import REPO, requires_bench_client
from tuner.errors import TeardownError
from tuner.machine.gpu import GpuInfo, visible_indices
from tuner.server import ServerHandle, find_free_port, kill_orphan, start_server
from tuner.storage.attrs import ATTR_LAUNCHED, ATTR_REASON, ATTR_TRIAL_DIR

pytestmark = [pytest.mark.e2e, requires_bench_client]
QUALITY_REF_ATTR = "kttune:quality_reference"


@pytest.fixture(autouse=True)
def _kill_leftovers(tmp_path: Path):
    """Whatever a failing test left running is killed afterwards (the marker is per test)."""
    yield
    marker_file = tmp_path / "marker"
    if marker_file.exists():
        for p in marked_processes(marker_file.read_text()):
            p.kill()


CASES = {case.name: case for case in cases()}


def _check_segfault(res: CaseResult) -> None:
    # The decisive line of the server's log comes first, not the bench client's view.
    assert res.message == "Fatal Python error: Segmentation fault"


def _check_crash_during_bench(res: CaseResult) -> None:
    assert res.message.startswith("RuntimeError: CUDA error: an illegal memory access"), res.message


def _check_unknown_flag(res: CaseResult) -> None:
    assert "kt-amx-weight-path" in res.message


def _check_stall_after_kv(res: CaseResult) -> None:
    assert "last phase: KV cache allocated" in res.message
    assert "nothing measured" in res.stderr_tail  # a launch that never measured spends nothing


def _check_unhealthy(res: CaseResult) -> None:
    assert "/health never 200" in res.message


def _check_environment_stop(res: CaseResult) -> None:
    # Stops name their cause.
    assert "3 environment faults in a row (bench_no_result, port_in_use, unhealthy)" in res.stderr_tail, res.stderr_tail


def _check_hang(res: CaseResult) -> None:
    # Stall detection ends a hang long before the start timeout (three hangs in one run).
    assert res.wall_s < 3 * START_TIMEOUT_S


def _check_baseline(res: CaseResult) -> None:
    # The baseline (the first launch) is the output-quality reference of its study.
    ref = optuna.load_study(study_name=STUDY, storage=res.storage).user_attrs.get(QUALITY_REF_ATTR)
    assert ref and ref["problems"] == [None] * 4


def _check_garbage(res: CaseResult) -> None:
    # Garbage output is the configuration's fault (infeasible for the sampler) and never benchmarked.
    garbage = optuna.load_study(study_name=STUDY, storage=res.storage).trials[0]
    assert garbage.state == optuna.trial.TrialState.COMPLETE and garbage.constraints["launch_failed"] > 0
    quality = json.loads((Path(garbage.user_attrs[ATTR_TRIAL_DIR]) / "quality.json").read_text())
    assert not quality["ok"] and {r["problem"] for r in quality["replies"]} == {"low_diversity"}
    assert not (Path(garbage.user_attrs[ATTR_TRIAL_DIR]) / "bench-decode.jsonl").exists()


def _check_neighbour(res: CaseResult) -> None:
    # The neighbour's memory on GPU 0 did not hold up our teardown on GPU 1.
    assert res.teardown_s[0] < 10


# What some rows must show beyond their classification; each name is a row of the matrix.
CHECKS: dict[str, Callable[[CaseResult], None]] = {
    "native crash (segfault) at every start": _check_segfault,
    "crash during the benchmark, every launch": _check_crash_during_bench,
    "unknown flag (compat check off)": _check_unknown_flag,
    "stall after the KV cache is allocated": _check_stall_after_kv,
    "HTTP up, /health never 200": _check_unhealthy,
    "environment faults of three kinds in a row": _check_environment_stop,
    "hang at start, every launch": _check_hang,
    "none (baseline)": _check_baseline,
    "garbage output, every launch": _check_garbage,
    "neighbour's server holds GPU 0, ours runs on GPU 1": _check_neighbour,
}


def test_every_check_names_a_row_of_the_matrix() -> None:
    assert set(CHECKS) <= set(CASES)


def _case_id(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# One `kttune run` per row, each its own test: under pytest-xdist the rows run side by side
# (they mostly wait on servers, stall timeouts and the 10 s leftover check).
@pytest.mark.parametrize("name", list(CASES), ids=[_case_id(n) for n in CASES])
def test_a_fault_is_classified_costs_what_it_should_and_leaves_nothing(name: str, tmp_path: Path) -> None:
    res = run_case(CASES[name], tmp_path)
    assert res.settle(), "the processes left behind were never counted"
    report = table([res]) + "\n" + res.stderr_tail
    assert res.ok, report
    assert res.left == [], report  # nothing alive 10 s after the tuner died
    if name in CHECKS:
        CHECKS[name](res)


def _wait_for(cond, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"kttune exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_sigterm_during_a_benchmark_tears_down_and_marks_interrupted(tmp_path: Path) -> None:
    h = prepare(tmp_path, [Fault("none", None), Fault("none", None)])
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", *h.cli_args(), "--seed", "0"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: any((tmp_path / "studies").rglob("bench-decode.argv.json")), 120,
                  "the first benchmark", proc)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert rc == 130, text[-3000:]
    assert "the running trial was marked interrupted" in text
    study = optuna.load_study(study_name=STUDY, storage=h.storage)
    (t,) = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs[ATTR_REASON] == "interrupted"
    assert marked_processes(h.marker) == []  # server tree and bench client are gone
    assert not (Path(t.user_attrs[ATTR_TRIAL_DIR]) / "server.pid").exists()


def test_a_flag_the_installed_server_lacks_is_refused_before_any_launch(tmp_path: Path) -> None:
    h = prepare(tmp_path, [Fault("none", None)])
    text = h.space.read_text().replace("  args:\n", "  args:\n    kt-amx-weight-path: /old/flag\n", 1)
    h.space.write_text(text)
    res = subprocess.run([sys.executable, "-m", "tuner.cli", *h.cli_args()], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and "--kt-amx-weight-path" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "faults.db").exists() and not list(h.state.glob("launch-*.json"))


class _GpuHeldBy:
    """GpuMonitor double: ``pids`` hold GPU memory for the first ``busy_polls`` polls."""

    def __init__(self, pids: set[int], busy_polls: int) -> None:
        self.pids, self.busy_polls, self.polls = pids, busy_polls, 0

    def probe_gpus(self) -> list[GpuInfo]:
        return [GpuInfo(0, "Fake", 80 << 30, 70 << 30, 10 << 30)]

    def gpu_processes(self, indices: Sequence[int] | None = None) -> dict[int, int]:
        self.polls += 1
        return {pid: 1 << 30 for pid in self.pids} if self.polls <= self.busy_polls else {}

    def used_bytes_total(self, indices: Sequence[int] | None = None) -> int | None:
        return 10 << 30

    def visible(self, spec: str | None) -> list[int] | None:
        return visible_indices(spec, self.probe_gpus())


def _orphan(tmp_path: Path) -> ServerHandle:
    port = find_free_port("127.0.0.1")
    argv = [sys.executable, str(REPO / "tests" / "fake_servers" / "fake_server.py"), "--port", str(port)]
    return start_server(argv, log_path=tmp_path / "server.log", host="127.0.0.1", port=port)


def test_killing_an_orphan_waits_until_its_gpu_memory_is_released(tmp_path: Path) -> None:
    h = _orphan(tmp_path)
    gpu = _GpuHeldBy({h.pid}, busy_polls=3)
    assert kill_orphan(h.pid_file, term_timeout_s=2, gpu=gpu, gpu_timeout_s=10) is True
    h.proc.wait(timeout=5)
    assert gpu.polls > 3 and not h.pid_file.exists()


def test_an_orphan_whose_gpu_memory_stays_stops_the_study_naming_it(tmp_path: Path) -> None:
    h = _orphan(tmp_path)
    with pytest.raises(TeardownError) as err:
        kill_orphan(h.pid_file, term_timeout_s=2, gpu=_GpuHeldBy({h.pid}, busy_polls=10**6), gpu_timeout_s=0.5)
    h.proc.wait(timeout=5)
    assert f"tree PIDs still on GPU [{h.pid}]" in str(err.value) and "\n" not in str(err.value)


def test_a_second_interrupt_during_teardown_still_clears_the_tree(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C twice: the first lands once the server is ready, the second inside stop_server.
    The tree must still be torn down before the interrupt propagates."""
    import tuner.trial.launch as trial_mod
    from tuner.config import load_space

    real_stop = trial_mod.stop_server
    calls: list[int] = []

    def impatient_stop(handle: ServerHandle, **kw: object):  # type: ignore[no-untyped-def]
        calls.append(handle.pid)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the second Ctrl-C
        return real_stop(handle, **kw)  # type: ignore[arg-type]

    def ctrl_c_when_ready(phase: str) -> None:
        if phase == "checking output quality":
            raise KeyboardInterrupt  # the first Ctrl-C

    monkeypatch.setattr(trial_mod, "stop_server", impatient_stop)
    h = prepare(tmp_path, [Fault("none", None)])
    space = load_space(h.space)
    with pytest.raises(KeyboardInterrupt):
        trial_mod.run_trial(space, space.launch_flags(dict(space.baseline or {})), tmp_path / "trial",
                            on_phase=ctrl_c_when_ready)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert marked_processes(h.marker) == []
    assert not (tmp_path / "trial" / "server.pid").exists()
