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
    # numbers that are not numbers
    "NaN timeout": (lambda d: d["bench"].update({"timeout_s": float("nan")}), ["bench.timeout_s", "finite"]),
    "infinite start timeout": (lambda d: d["server"].update({"start_timeout_s": float("inf")}),
                               ["server.start_timeout_s", "finite"]),
    "infinite time scale": (lambda d: d["bench"].update({"time_scale": float("inf")}), ["bench.time_scale", "finite"]),
    "negative latency bound": (lambda d: d.update({"slo": ["decode.p99_ttft_ms <= -5"]}), ["slo[0]", "> 0"]),
    "zero throughput bound": (lambda d: d.update({"slo": [{"workload": "decode", "metric": "output_throughput",
                                                           "min": 0}]}), ["slo[0].min", "> 0"]),
    "count too large": (lambda d: d["workloads"]["decode"].update({"num_prompts": 10**12}),
                        ["workloads.decode.num_prompts", "larger than any machine"]),
    "NaN RAM": (lambda d: d["hardware"].update({"ram_gib": float("nan")}), ["hardware.ram_gib", "finite"]),
    # environment and values passed on
    "list as an env value": (lambda d: d["server"].update({"env": {"OMP_NUM_THREADS": [1, 2]}}),
                             ["server.env.OMP_NUM_THREADS", "must be text"]),
    "null env value": (lambda d: d["bench"].update({"env": {"HF_HUB_OFFLINE": None}}),
                       ["bench.env.HF_HUB_OFFLINE", "must be text"]),
    "bad env name": (lambda d: d["server"].update({"env": {"A B": "1"}}), ["server.env.A B", "variable name"]),
    "misspelt KTTUNE variable in server.env": (lambda d: d["server"].update({"env": {"KTTUNE_SIM_FAULTS": "x"}}),
                                               ["server.env variable KTTUNE_SIM_FAULTS", "KTTUNE_SIM_FAULT"]),
    # files given to flags
    "--config inside server.args": (lambda d: d["server"]["args"].update({"config": "other.yaml"}),
                                    ["server.args.config", "into server.args"]),
    "missing expert-location file": (lambda d: d["server"]["args"].update({"init-expert-location": "/nonexistent/e.json"}),
                                     ["server.args.init-expert-location", "not a file"]),
    # names and paths
    "study name with a separator": (lambda d: d.update({"name": "team/qwen"}), ["name (of the space)", "cannot name a study"]),
    "dataset is a folder": (lambda d: d["bench"].update({"dataset_path": "tuner"}), ["bench.dataset_path", "is a folder"]),
    "model path is a file": (lambda d: d["server"]["args"].update({"model-path": "README.md"}),
                             ["server.args.model-path", "is a file"]),
    "tokenizer is a file": (lambda d: d["bench"].update({"tokenizer": "README.md"}), ["bench.tokenizer", "is a file"]),
    # a dataset file the bench client cannot use
    "dataset is not ShareGPT": (lambda d: d["bench"].update({"dataset_path": "tuner/sim/models/qwen3-30b-a3b/config.json"}),
                                ["bench.dataset_path", "not a JSON list"]),
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


def test_a_key_given_twice_and_a_folder_as_space(tmp_path: Path) -> None:
    text = SPACE.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "\nparams:\n  kt-cpuinfer: {low: 1, high: 4}\n")  # a second params block
    assert_refused(kttune("plan", "--space", str(twice)), "line", "'params' is given twice", "keep one")
    inner = tmp_path / "spaces"
    inner.mkdir()
    (inner / "a.yaml").write_text(text)
    assert_refused(kttune("best", "--space", str(inner)), "--space", "is a folder", "a.yaml")


def test_records_with_a_broken_dataset_later_in_the_file_are_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(SPACE.read_text())
    broken = tmp_path / "sharegpt.json"
    broken.write_text('[{"conversations": [{"from": "human", "value": "hi"}]}, {"conv')
    data["bench"]["dataset_path"] = str(broken)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    assert_refused(kttune("run", "--space", str(space), "--budget", "1", "--studies-dir", str(tmp_path / "s")),
                   "bench.dataset_path", "not valid JSON")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, words", [
    (["run", "--seed", "-1", "--dry-run"], ["--seed", "between 0 and"]),
    (["run", "--seed", str(2**40), "--dry-run"], ["--seed"]),
    (["run", "--study", "../up", "--dry-run"], ["--study", "cannot name a study"]),
    (["run", "--storage", "sqlite:///:memory:"], ["--storage", "in-memory"]),
    (["best", "--storage", "sqlite://"], ["--storage", "in-memory"]),
    (["run", "--studies-dir", "README.md"], ["--studies-dir", "is a file"]),
    (["run", "--studies-dir", "/proc/kttune"], ["--studies-dir", "kernel file system"]),
    (["run", "--storage", "sqlite:///README.md"], ["--storage", "not a database"]),
    (["dashboard", "--port", "70000"], ["--port", "not a TCP port"]),
    (["doctor", "--timeout", "nan"], ["--timeout", "positive number"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_command_line_values_that_cannot_work(tmp_path: Path, args: list[str], words: list[str]) -> None:
    space = [] if args[0] == "doctor" else ["--space", str(SPACE)]
    before = tree_digest(REPO / "studies") if (REPO / "studies").exists() else {}
    done = kttune(*args, *space)
    assert_refused(done, *words)
    assert (tree_digest(REPO / "studies") if (REPO / "studies").exists() else {}) == before


@pytest.mark.parametrize("name, value, words", [
    ("KTTUNE_HEARTBEAT", "5", ["KTTUNE_HEARTBEAT", "did you mean KTTUNE_HEARTBEAT_S?"]),
    ("KTTUNE_HEARTBEAT_S", "0.5", ["KTTUNE_HEARTBEAT_S", "whole number"]),
    ("KTTUNE_SIM_FAULT", "crash_at_begin", ["KTTUNE_SIM_FAULT", "crash_at_start"]),
    ("KTTUNE_SIM_DIALECT", "vllm", ["KTTUNE_SIM_DIALECT", "sglang-kt"]),
    ("KTTUNE_SIM_TIME_SCALE", "fast", ["KTTUNE_SIM_TIME_SCALE", "number"]),
    ("KTTUNE_RUNTIME_DIR", "relative/dir", ["KTTUNE_RUNTIME_DIR", "absolute"]),
])
def test_bad_kttune_variables(tmp_path: Path, name: str, value: str, words: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "run", "--space", str(SPACE), "--budget", "1",
                           "--studies-dir", str(tmp_path / "studies")], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, name: value})
    assert_refused(done, *words)
    assert not (tmp_path / "studies").exists()


def test_nothing_to_do_export_and_a_dashboard_port_in_use(tmp_path: Path, study_db: str) -> None:
    done = kttune("export", "--space", str(SPACE), "--study", "s", "--storage", study_db, "--out", str(tmp_path / "b.yaml"))
    assert_refused(done, "--study", "no measured trial to export", "kttune run")
    assert not (tmp_path / "b.yaml").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = kttune("dashboard", "--space", str(SPACE), "--study", "s", "--storage", study_db, "--port", str(port))
    assert_refused(done, "--port", "cannot listen", "another --port")


def test_a_dense_model_is_named_as_such(tmp_path: Path) -> None:
    model = tmp_path / "dense"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, '
                                       '"num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 128256}')
    done = kttune("init", "--model", str(model), "--gpus", "1x L20-48G", "--cpu", "1x32", "--amx", "--ram-gib", "256",
                  "--out", str(tmp_path / "x.yaml"))
    assert_refused(done, "no routed experts", "a dense model")
    assert not (tmp_path / "x.yaml").exists()


def test_a_quoted_tilde_is_the_home_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "spaces").mkdir(parents=True)
    (home / "spaces" / "q.yaml").write_text(SPACE.read_text())
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "run", "--space", "~/spaces/q.yaml", "--dry-run",
                           "--budget", "1", "--studies-dir", "~/studies"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert f"{home}/studies/" in done.stdout and not (REPO / "~").exists()
