"""Leftovers: server trees a dead kttune left running, found through the host's registry."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tuner.server import PID_FILE_NAME, find_free_port, find_leftovers, leftover_note, reap_leftovers
from tuner.server.registry import entries, runtime_dir

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fake_servers" / "fake_server.py"
HOST = "127.0.0.1"


def _dead_tuner_with_a_live_tree(tmp_path: Path) -> tuple[int, int]:
    """A tuner that launched a server whose TERM-proof child survives everything around it:
    tuner and watchdog are SIGKILLed together (as `kill -9` of a whole session would), the
    launcher dies with its watchdog, the child lives on. Returns (watchdog PID, child PID)."""
    port = find_free_port(HOST)
    argv = [sys.executable, str(FAKE), "--host", HOST, "--port", str(port), "--child-ignores-term"]
    code = ("import sys, time\nfrom pathlib import Path\nfrom tuner.server import start_server\n"
            f"h = start_server({argv!r}, log_path=Path({str(tmp_path / 's.log')!r}), host={HOST!r}, port={port})\n"
            "print(h.pid, flush=True)\ntime.sleep(60)\n")
    tuner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True)
    assert tuner.stdout is not None
    watchdog = int(tuner.stdout.readline())
    deadline = time.monotonic() + 10
    child = 0
    while not child and time.monotonic() < deadline:
        text = (tmp_path / "s.log").read_text()
        if "FAKE child_pid=" in text:
            child = int(text.split("FAKE child_pid=")[1].split()[0])
        time.sleep(0.05)
    os.kill(watchdog, signal.SIGKILL)
    tuner.kill()
    tuner.wait()
    time.sleep(0.5)
    assert psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    return watchdog, child


def test_a_dead_tuners_tree_is_reported_then_reaped(tmp_path: Path) -> None:
    watchdog, child = _dead_tuner_with_a_live_tree(tmp_path)
    (found,) = find_leftovers()
    assert found.pid == watchdog and child in found.pids
    note = leftover_note([found])
    assert note is not None and str(child) in note and "kttune run" in note
    lines: list[str] = []
    assert reap_leftovers(lines.append, gpu_timeout_s=1) == 1
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert find_leftovers() == [] and list(entries()) == [] and not (tmp_path / PID_FILE_NAME).exists()
    assert lines and "stopped a server tree" in lines[0]


def test_a_live_tuners_server_is_not_a_leftover(tmp_path: Path) -> None:
    from tuner.server import start_server, stop_server

    port = find_free_port(HOST)
    h = start_server([sys.executable, str(FAKE), "--host", HOST, "--port", str(port)], log_path=tmp_path / "s.log",
                     host=HOST, port=port)
    try:
        assert [data["token"] for _, data in entries()] == [h.token]
        assert find_leftovers() == []  # its owner (this process) is alive
        assert reap_leftovers(lambda _m: None) == 0 and h.proc.poll() is None
    finally:
        stop_server(h, term_timeout_s=2, gpu_timeout_s=1)
    assert list(entries()) == []  # teardown removes the entry with the pid file


def test_an_entry_whose_tree_is_gone_is_dropped_silently(tmp_path: Path) -> None:
    folder = runtime_dir() / "servers"
    folder.mkdir(parents=True)
    (folder / "abc.json").write_text(json.dumps({"pid": 2**22 + 7, "create_time": 1.0, "token": "abc",
                                                  "owner_pid": 2**22 + 9, "owner_create_time": 1.0}))
    assert find_leftovers() == [] and list(entries()) == []


def test_read_only_commands_warn_about_leftovers_and_a_run_of_another_study_reaps_them(tmp_path: Path) -> None:
    _, child = _dead_tuner_with_a_live_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    best = subprocess.run([sys.executable, "-m", "tuner.cli", "best", "--studies-dir", str(tmp_path / "none")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "left running by a kttune that is gone" in best.stderr and str(child) in best.stderr
    assert psutil.pid_exists(child)  # reported, not touched
    import optuna

    from tests.search.test_sampler import sim_space
    from tuner.loop.run import RunOptions, run_study
    from tuner.sim.inprocess import InProcessRunner

    lines: list[str] = []
    opts = RunOptions(study_name="other", storage=optuna.storages.InMemoryStorage(), budget=1, seed=0,
                      studies_dir=tmp_path, check_feasibility=False)
    run_study(sim_space("qwen3-30b-a3b-1x4090"), opts, log=lines.append, runner=InProcessRunner(noise_sigma=0.0))
    assert any("stopped a server tree a dead kttune left behind" in ln for ln in lines)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
