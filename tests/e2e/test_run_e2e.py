"""`kttune run` end to end on the simulated server with the REAL sglang.bench_serving client."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from tests.conftest import REPO, bench_python, requires_bench_client
from tuner.storage.attrs import ATTR_BASELINE, ATTR_LAUNCHED, ATTR_REASON, ATTR_TRIAL_DIR, METRIC_PREFIX
from tuner.storage.open import make_storage

pytestmark = [pytest.mark.e2e, requires_bench_client]
SIM_SPACE = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml"


def fast_space(tmp_path: Path, scale: float = 0.01, **changes: object) -> Path:
    """The shipped sim space, faster: the same flags with a smaller time scale."""
    data = yaml.safe_load(SIM_SPACE.read_text())
    data["server"]["args"]["sim-time-scale"] = scale
    data["bench"]["time_scale"] = scale
    # A real flag that tags every server this test starts, so leftovers can be found.
    data["server"]["args"]["served-model-name"] = marker(tmp_path)
    data.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def marker(tmp_path: Path) -> str:
    """Unique per test and per pytest session (tmp_path's name alone repeats across sessions)."""
    return "kttune-e2e-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]


def kttune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def study_args(tmp_path: Path, space: Path) -> list[str]:
    return ["--space", str(space), "--study", "e2e", "--storage", f"sqlite:///{tmp_path / 'e2e.db'}",
            "--studies-dir", str(tmp_path / "studies")]


def load(tmp_path: Path) -> optuna.Study:
    # kttune's own opener: a poll may meet the tuner creating the tables, which it waits out
    return optuna.load_study(study_name="e2e", storage=make_storage(f"sqlite:///{tmp_path / 'e2e.db'}"))


def try_load(tmp_path: Path) -> optuna.Study | None:
    """The study, or None while the first run has not created it yet."""
    try:
        return load(tmp_path)
    except KeyError:
        return None


@pytest.fixture(autouse=True)
def _no_leftover_servers(tmp_path: Path):
    """Whatever a failing test left running under its tmp_path is killed afterwards."""
    yield
    for p in sim_processes(marker(tmp_path)):
        p.kill()


def launched(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.user_attrs.get(ATTR_LAUNCHED)]


def sim_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "tuner.sim" in cmd and marker in cmd:
            found.append(p)
    return found


def describe_leftovers(tmp_path: Path) -> str:
    """What a leftover server was (its port names the trial) — for a failure message."""
    lines = []
    for p in sim_processes(marker(tmp_path)):
        try:
            cmd = p.cmdline()
            port = cmd[cmd.index("--port") + 1] if "--port" in cmd else "?"
            lines.append(f"pid {p.pid} ppid {p.ppid()} port {port} started {p.create_time():.1f}")
        except psutil.Error:
            continue
    for trial_dir in sorted((tmp_path / "studies").glob("*/trial-*")):
        argv = trial_dir / "server.argv.json"
        port = json.loads(argv.read_text())[-1] if argv.exists() else "?"
        lines.append(f"{trial_dir.name}: port {port}, pid file {'present' if (trial_dir / 'server.pid').exists() else 'absent'}")
    return "\n".join(lines)


def test_run_budget_3_then_best_and_export(tmp_path: Path) -> None:
    space = fast_space(tmp_path)
    res = kttune("run", *study_args(tmp_path, space), "--budget", "3", "--seed", "0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    study = load(tmp_path)
    runs = launched(study)
    assert len(runs) == 3
    first = study.trials[0]
    assert first.user_attrs.get(ATTR_BASELINE) is True
    assert first.params == {"kt-num-gpu-experts": 200, "kt-cpuinfer": 56, "kt-threadpool-count": 2,
                            "chunked-prefill-size": 4096, "max-running-requests": 37}
    assert first.state == optuna.trial.TrialState.COMPLETE and first.user_attrs[ATTR_REASON] is None
    for t in runs:
        if t.user_attrs[ATTR_REASON] is not None:
            continue
        trial_dir = Path(t.user_attrs[ATTR_TRIAL_DIR])
        # The metric is the client's own JSON line, rescaled from simulated time.
        line = json.loads((trial_dir / "bench-decode.jsonl").read_text().splitlines()[-1])
        assert line["completed"] == 37
        assert t.user_attrs[METRIC_PREFIX + "decode.output_throughput"] == pytest.approx(line["output_throughput"] * 0.01)
        assert t.values[0] == t.user_attrs[METRIC_PREFIX + "decode.output_throughput"]
        assert "The server is fired up and ready to roll!" in (trial_dir / "server.log").read_text()
    # The seed config on the seed scenario measures near the seed's 45.91 tok/s.
    assert 35 < first.values[0] < 57
    assert sim_processes(marker(tmp_path)) == []

    best = kttune("best", *study_args(tmp_path, space))
    assert best.returncode == 0 and "decode.output_throughput" in best.stdout
    out = tmp_path / "best.yaml"
    exp = kttune("export", *study_args(tmp_path, space), "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    text = out.read_text()
    assert text.startswith("# kttune profile") and "# study: e2e" in text
    profile = yaml.safe_load(text)
    assert profile["kt-num-gpu-experts"] == study.best_trial.params["kt-num-gpu-experts"]
    assert profile["enable-mixed-chunk"] is True and "host" not in profile and "port" not in profile
    _check_with_sglang_config_parser(out, profile)


def _check_with_sglang_config_parser(path: Path, profile: dict) -> None:
    """Expand the profile with sglang's own ConfigArgumentMerger (from the bench venv) and
    compare with the argv kttune launched the trial with."""
    from tuner.server.argv import flag_args

    booleans = [k.replace("-", "_") for k, v in profile.items() if isinstance(v, bool)]
    code = ("import json,sys\nfrom sglang.srt.server_args_config_parser import ConfigArgumentMerger\n"
            f"m = ConfigArgumentMerger(boolean_actions={booleans!r})\n"
            "print(json.dumps(m.merge_config_with_args(['--config', sys.argv[1]])))")
    res = subprocess.run([str(bench_python()), "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == flag_args(profile)


def test_dry_run_prints_argvs_and_writes_nothing(tmp_path: Path) -> None:
    res = kttune("run", "--space", "search_spaces/kimi-k2-thinking-8xl20.yaml", "--budget", "5", "--dry-run",
                 "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--studies-dir", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "sglang.launch_server" in ln]
    assert len(lines) == 5
    assert "--kt-num-gpu-experts 200 " in lines[0] and "--kt-cpuinfer 56 " in lines[0]
    for ln in lines:
        for fixed in ("--kt-method AMXINT4", "--tensor-parallel-size 8", "--max-total-tokens 37000",
                      "--enable-mixed-chunk", "--host 127.0.0.1", "--disable-radix-cache"):
            assert fixed in ln
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "s").exists()


def test_bad_space_is_one_line_exit_2_and_nothing_written(tmp_path: Path) -> None:
    space = fast_space(tmp_path, params={"kt-cpuinfer": {"low": 64, "high": 16}})
    res = kttune("run", *study_args(tmp_path, space), "--budget", "2")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "params.kt-cpuinfer" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "e2e.db").exists()


def test_resume_after_the_tuner_is_killed(tmp_path: Path) -> None:
    # Judged: that no figure is lost or rewritten, not the figures; the fastest scale will do.
    space = fast_space(tmp_path, scale=0.002)
    args = [sys.executable, "-m", "tuner.cli", "run", *study_args(tmp_path, space), "--budget", "4", "--seed", "1"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            time.sleep(1)
            study = try_load(tmp_path) if (tmp_path / "e2e.db").exists() else None
            if study is not None:
                done = [t for t in launched(study) if t.state.is_finished()]
                if len(done) >= 2 and any(t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get(ATTR_LAUNCHED)
                                          for t in study.trials):  # its server runs
                    break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        else:
            pytest.fail("the first run never reached its third trial")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the tuner only: its server is left orphaned
        proc.wait()
    before = {t.number: t.values for t in load(tmp_path).trials if t.state.is_finished()}
    res = kttune("run", *study_args(tmp_path, space), "--budget", "4", "--seed", "1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    study = load(tmp_path)
    after = {t.number: t.values for t in study.trials if t.state.is_finished()}
    assert all(after[n] == v for n, v in before.items())  # nothing lost or rewritten
    interrupted = [t for t in study.trials if t.user_attrs.get(ATTR_REASON) == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].state == optuna.trial.TrialState.FAIL
    counted = [t for t in launched(study) if t.user_attrs.get(ATTR_REASON) != "interrupted"]
    assert len(counted) == 4
    assert sim_processes(marker(tmp_path)) == [], describe_leftovers(tmp_path) + "\n" + res.stdout[-3000:]
