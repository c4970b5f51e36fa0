"""What a new user tripped over, through the real `kttune` command line: a failed trial says
why on screen, in the run's own output and on exit 3; output piped into `head` ends quietly."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"


def kttune(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def write_space(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_failed_trial_shows_its_decisive_line_in_the_run_output_and_on_exit_3(tmp_path: Path) -> None:
    data = copy.deepcopy(yaml.safe_load(SPACE.read_text()))
    data["server"].setdefault("env", {})["KTTUNE_SIM_FAULT"] = "crash_at_start"  # the simulator segfaults at start
    done = kttune("run", "--space", str(write_space(tmp_path, data)), "--budget", "1", "--no-compat-check",
                  "--studies-dir", str(tmp_path / "studies"))
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    failed = next(i for i, ln in enumerate(lines) if ln.startswith("trial 0: scheduler_dead"))
    assert lines[failed + 1] == "  why: Fatal Python error: Segmentation fault"
    assert "launching took 0.0" not in done.stdout  # the first phase is not announced twice
    err = done.stderr.splitlines()
    assert err[0].startswith("kttune: nothing measured") and "kttune report` shows why" not in done.stderr
    assert err[1] == "  trial 0: scheduler_dead: Fatal Python error: Segmentation fault"


def test_output_into_a_closed_pipe_ends_with_exit_0_and_no_traceback() -> None:
    """`kttune ... | head` where head has already gone: the reader closed its end first."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "tuner.cli", "plan", "--space", str(SPACE), "--set",
                               "kt-num-gpu-experts=10"], stdout=write, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
