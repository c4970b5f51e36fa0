"""The `kttune` command line: every command through the real CLI (a subprocess of this
checkout), its output and exit code; commands that only read a study never create a storage
(a study that does not exist is one line naming the fix, exit 2, nothing left behind)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tuner.cli import main

SPACE = str(REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml")


@pytest.mark.parametrize("command", [["best"], ["export", "--out", "x.yaml"], ["report"]])
def test_read_only_commands_on_a_missing_study_create_nothing(tmp_path: Path, command: list[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    studies = tmp_path / "studies"
    rc = main([command[0], "--space", SPACE, "--study", "nosuch", "--studies-dir", str(studies), *command[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no study database" in err and "kttune run" in err
    assert not studies.exists() and not list(tmp_path.iterdir())


def test_version_and_a_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("kttune 0.")
    with pytest.raises(SystemExit) as done:
        main([])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "(see kttune --help)" in err


# --- every command through the real CLI, as a user runs it ---------------------------------
KIMI = "search_spaces/sim-kimi-k2-thinking-8xl20.yaml"


def kttune(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m tuner.cli` of this checkout (PYTHONPATH: the worktree's tuner, not an installed one)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("command", [["run"], ["run", "--dry-run"], ["best"], ["plan"], ["show", "0"],
                                     ["export", "--out", "x.yaml"], ["report"], ["dashboard"]])
def test_a_missing_space_is_an_error_that_lists_the_shipped_spaces(tmp_path: Path, command: list[str]) -> None:
    res = kttune(*command, "--studies-dir", str(tmp_path / "studies"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "--space: required" in res.stderr and "sim-kimi-k2-thinking-8xl20.yaml" in res.stderr
    assert "kttune init" in res.stderr and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-launch study of the Kimi space, run by the in-process simulator (minutes of
    bench_serving otherwise; the e2e tier runs the real client): (database, studies dir)."""
    from tuner.config import load_space
    from tuner.loop import RunOptions, run_study
    from tuner.sim.inprocess import InProcessRunner

    root = tmp_path_factory.mktemp("cli")
    db = root / "studies" / "k.db"
    db.parent.mkdir()
    space = load_space(REPO / KIMI, check_paths=False)
    run_study(space, RunOptions(study_name="k", storage=f"sqlite:///{db}", budget=4, seed=0, studies_dir=db.parent),
              log=lambda _m: None, runner=InProcessRunner(noise_sigma=0.0))
    return db, db.parent


def study_args(study_db: tuple[Path, Path]) -> list[str]:
    return ["--space", KIMI, "--study", "k", "--storage", f"sqlite:///{study_db[0]}", "--studies-dir", str(study_db[1])]


def test_studies_lists_name_trials_best_and_storage(study_db: tuple[Path, Path], tmp_path: Path) -> None:
    text = kttune("studies", "--studies-dir", str(study_db[1]))
    assert text.returncode == 0, text.stderr
    assert "k.db" in text.stdout and "trial " in text.stdout and "tok/s" in text.stdout
    res = kttune("studies", "--studies-dir", str(study_db[1]), "--format", "json")
    rows = json.loads(res.stdout)
    assert res.returncode == 0 and [r["name"] for r in rows] == ["k"] and rows[0]["trials"] >= 4
    assert rows[0]["launched"] == 4 and rows[0]["storage"] == f"sqlite:///{study_db[0]}"
    assert rows[0]["best_trial"] is not None and rows[0]["best"]["decode.output_throughput"] > 0
    empty = kttune("studies", "--studies-dir", str(tmp_path / "none"))
    assert empty.returncode == 0 and "no study databases" in empty.stdout and not (tmp_path / "none").exists()
    missing = kttune("studies", "--storage", f"sqlite:///{tmp_path / 'nosuch.db'}")
    assert missing.returncode == 2 and "--storage" in missing.stderr and not list(tmp_path.iterdir())


def test_best_fits_80_columns_and_as_json_names_the_same_trial(study_db: tuple[Path, Path]) -> None:
    text = kttune("best", *study_args(study_db), "--format", "text")
    data = kttune("best", *study_args(study_db), "--format", "json")
    assert text.returncode == 0 and data.returncode == 0, text.stderr + data.stderr
    lines = text.stdout.splitlines()
    table = lines[lines.index("best trial:") + 1:next(i for i, ln in enumerate(lines) if ln.startswith("how sure"))]
    assert table and max(len(line) for line in table) <= 80  # the table fits a terminal; prose is not cut into a pipe
    assert next(ln for ln in lines if ln.startswith("how sure")).endswith(("(sd)", "adds runs"))
    assert "e+0" not in text.stdout and "tok/s" in text.stdout
    best = json.loads(data.stdout)
    number = best["picked"][0]["trial"]
    header = next(line for line in text.stdout.splitlines() if line.startswith("trial "))
    assert best["objectives"] == ["decode.output_throughput"] and header.split()[1] == str(number)
    assert best["picked"][0]["params"]["kt-num-gpu-experts"] == int(best["picked"][0]["flags"]["kt-num-gpu-experts"])


def test_show_prints_one_trial_and_refuses_a_missing_one(study_db: tuple[Path, Path]) -> None:
    text = kttune("show", "0", *study_args(study_db))
    assert text.returncode == 0, text.stderr
    assert "trial 0: feasible" in text.stdout and "kt-num-gpu-experts" in text.stdout and "phases" in text.stdout
    data = json.loads(kttune("show", "0", *study_args(study_db), "--format", "json").stdout)
    assert data["trial"] == 0 and data["state"] == "COMPLETE" and data["user_attrs"]["baseline"] is True
    assert data["metrics"]["decode.output_throughput"] == data["values"]["decode.output_throughput"]
    bad = kttune("show", "99", *study_args(study_db))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "TRIAL" in bad.stderr and "got 99" in bad.stderr


def test_plan_as_json(tmp_path: Path) -> None:
    res = kttune("plan", "--space", KIMI, "--set", "kt-num-gpu-experts=400", "--format", "json")
    data = json.loads(res.stdout)
    assert res.returncode == 1 and data["feasible"] is False and data["binding"] and data["fix"]
    ok = json.loads(kttune("plan", "--space", KIMI, "--format", "json").stdout)
    assert ok["feasible"] is True and ok["max_gpu_experts"] >= ok["flags"]["kt-num-gpu-experts"]
    assert ok["gpu_memory_gb"]["total"] <= ok["gpu_memory_gb"]["available"]


def test_doctor_as_json(tmp_path: Path) -> None:
    res = kttune("doctor", "--space", KIMI, "--studies-dir", str(tmp_path / "s"), "--format", "json", timeout=600)
    checks = json.loads(res.stdout)
    assert {"name", "status", "detail", "fix"} <= set(checks[0])
    assert res.returncode == (1 if any(c["status"] == "FAIL" for c in checks) else 0)
    assert not (tmp_path / "s").exists()  # a read-only command: no storage created


def test_dry_run_prints_the_server_and_bench_argvs_of_distinct_launches() -> None:
    res = kttune("run", "--space", KIMI, "--dry-run", "--budget", "3", "--seed", "0")
    assert res.returncode == 0, res.stderr
    servers = [ln for ln in res.stdout.splitlines() if ln.startswith("  server: ")]
    benches = [ln for ln in res.stdout.splitlines() if ln.startswith("  bench ")]
    assert len(servers) == 3 and len(set(servers)) == 3  # the warm start's copy of the baseline is skipped
    assert len(benches) == 3 * 3 and all("sglang.bench_serving" in b for b in benches)  # probe, prefill, decode
    assert "the same configuration as trial 0 (printed above)" in res.stdout


def test_completion_scripts_complete_commands_options_and_choices() -> None:
    script = kttune("completion", "bash")
    assert script.returncode == 0 and "complete -o default -F _kttune kttune" in script.stdout

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        code = (f"{script.stdout}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _kttune; "
                'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30).stdout.split()

    assert {"run", "studies", "show", "init", "completion"} <= set(complete("kttune", "''"))
    assert complete("kttune", "stu") == ["studies"]
    assert "--format" in complete("kttune", "best", "--f")
    assert complete("kttune", "best", "--format", "''") == ["text", "json"]
    assert set(complete("kttune", "completion", "''")) == {"--help", "bash", "zsh"}
    zsh = kttune("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef kttune") and "bashcompinit" in zsh.stdout
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-n", "-c", zsh.stdout], timeout=30).returncode == 0
    assert kttune("completion", "fish").returncode == 2
