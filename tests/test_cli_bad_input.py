"""Bad input as a careless user gives it, through the real `kttune` command line: one line on
stderr naming the field and the fix, exit 2, no traceback, nothing written, no server started."""
from __future__ import annotations

import copy
import gzip
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


@pytest.fixture
def study_db(tmp_path: Path) -> str:
    """A study that exists (no trials), so what is refused is the bad argument, not its absence."""
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    return url


@pytest.mark.parametrize("command, out, words", [
    ("export", "/proc/best.yaml", ["--out", "cannot write in /proc"]),
    ("report", "/proc/kttune-report", ["--out", "cannot write in /proc"]),
    ("export", "{file}/best.yaml", ["--out", "does not exist"]),
    ("report", "{file}/report", ["--out", "is a file"]),
])
def test_out_where_nothing_can_be_written(tmp_path: Path, study_db: str, command: str, out: str,
                                          words: list[str]) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    before = tree_digest(tmp_path)
    done = kttune(command, "--space", str(SPACE), "--study", "s", "--storage", study_db,
                  "--out", out.format(file=a_file))
    assert_refused(done, *words)
    assert tree_digest(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_out_into_a_read_only_folder(tmp_path: Path, study_db: str) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    done = kttune("export", "--space", str(SPACE), "--study", "s", "--storage", study_db, "--out", str(folder / "b.yaml"))
    assert_refused(done, "--out", "cannot write in")
    assert not list(folder.iterdir())


def test_plan_set_with_a_misspelt_flag() -> None:
    done = kttune("plan", "--space", str(SPACE), "--set", "kt-num-gpu-expert=40")
    assert_refused(done, "--set: kt-num-gpu-expert", "did you mean kt-num-gpu-experts?")
    assert done.stdout == ""


@pytest.mark.parametrize("command", [["best"], ["export", "--out", "{tmp}/b.yaml"], ["report"], ["dashboard"]])
@pytest.mark.parametrize("url", ["sqlite:///{tmp}/none/x.db", "sqlite:///{tmp}/x.db?timeout=5"])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: list[str], url: str) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    done = kttune(args[0], "--space", str(SPACE), "--storage", url.format(tmp=tmp_path),
                  "--studies-dir", str(tmp_path / "studies"), *args[1:])
    assert_refused(done, "no study database at", "kttune run")
    assert not list(tmp_path.iterdir())


def test_read_only_commands_read_a_sqlite_url_with_a_query(study_db: str) -> None:
    done = kttune("best", "--space", str(SPACE), "--study", "s", "--storage", study_db + "?timeout=5")
    assert "no study database" not in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a database host that hangs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["best", "run"])
def test_an_unreachable_postgresql_storage_is_one_line_within_seconds(tmp_path: Path, silent_server: int,
                                                                      command: str) -> None:
    url = f"postgresql://kttune:hunter2@127.0.0.1:{silent_server}/kttune"
    started = time.monotonic()
    done = kttune(command, "--space", str(SPACE), "--storage", url, "--studies-dir", str(tmp_path / "studies"),
                  timeout=60)
    assert_refused(done, "--storage", "timeout expired")
    assert time.monotonic() - started < 20
    assert "hunter2" not in done.stderr  # the password is not printed
    assert not list(tmp_path.iterdir())
