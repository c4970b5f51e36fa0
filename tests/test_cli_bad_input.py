"""Bad input as a careless user gives it, through the real `kttune` command line: one line on
stderr naming the field and the fix, exit 2, no traceback, nothing written, no server started."""
from __future__ import annotations

import copy
import gzip
import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"


def kttune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    err = done.stderr
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("kttune: error: "), err
    assert "Traceback" not in err + done.stdout
    for w in words:
        assert w in err, err


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with its content hash: "untouched" means equal before and after."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def space_file(tmp_path: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    data = copy.deepcopy(yaml.safe_load(SPACE.read_text()))
    mutate(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BAD_SPACES = {
    "flag fixed and tuned": (lambda d: d["server"]["args"].update({"kt-cpuinfer": 22}),
                             ["server.args.kt-cpuinfer", "also tuned in params"]),
    "objective never reported": (lambda d: d["objective"][0].update({"metric": "output_thruput"}),
                                 ["objective[0].metric", "did you mean output_throughput"]),
    "slo never reported": (lambda d: d.update({"slo": ["decode.p99_ttfb_ms <= 5000"]}),
                           ["slo[0].metric", "p99_ttft_ms"]),
    "tokenizer missing": (lambda d: d["bench"].update({"tokenizer": "/nonexistent/tokenizer"}),
                          ["bench.tokenizer", "does not exist"]),
    "dataset missing": (lambda d: d["bench"].update({"dataset_path": "/nonexistent/sharegpt.json"}),
                        ["bench.dataset_path", "does not exist"]),
    "unknown dataset name": (lambda d: d["workloads"]["decode"].update({"dataset_name": "randm"}),
                             ["workloads.decode.dataset_name", "random"]),
    "float bounds for an int flag": (lambda d: d["params"].update({"max-running-requests": {"low": 8.0, "high": 64.5}}),
                                     ["params.max-running-requests.low", "whole-number"]),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_run_refuses_a_bad_space_before_anything_starts(tmp_path: Path, case: str) -> None:
    mutate, words = BAD_SPACES[case]
    studies = tmp_path / "studies"
    done = kttune("run", "--budget", "1", "--space", str(space_file(tmp_path, mutate)), "--studies-dir", str(studies))
    assert_refused(done, *words)
    assert not studies.exists()  # no database, no trial folder: no server was started


def _binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(SPACE.read_bytes()))


def _sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("create table t (x)")


@pytest.mark.parametrize("write, command", [(_binary, "run"), (_gzip, "best"), (_sqlite, "plan")],
                         ids=["binary", "gzip", "sqlite"])
def test_a_file_that_is_not_yaml_as_space(tmp_path: Path, write: Callable[[Path], None], command: str) -> None:
    space = tmp_path / "space.yaml"
    write(space)
    studies = tmp_path / "studies"
    assert_refused(kttune(command, "--space", str(space), "--studies-dir", str(studies)), "--space", "not a text file")
    assert not studies.exists()
