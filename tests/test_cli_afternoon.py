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


def _study_on_disk(tmp_path: Path, decode: tuple[list[float], list[float]], ttft: tuple[float, float]) -> str:
    """A stored study of the Qwen space: the baseline and one other configuration, each
    measured twice, with the given decode throughputs and decode median TTFT."""
    import optuna

    from tuner.config import load_space
    from tuner.storage.attrs import ATTR_BASELINE, ATTR_FLAGS, ATTR_LAUNCHED, ATTR_REASON, METRIC_PREFIX

    space = load_space(SPACE, check_paths=False)
    url = f"sqlite:///{tmp_path / 'q.db'}"
    study = optuna.create_study(study_name="q", storage=url, directions=space.directions)
    dists = space.distributions()
    base = dict(space.baseline or {})
    for params, values, latency, baseline in ((base, decode[0], ttft[0], True),
                                              ({**base, "kt-num-gpu-experts": 36}, decode[1], ttft[1], False)):
        for d in values:
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, values=[d],
                user_attrs={ATTR_LAUNCHED: True, ATTR_REASON: None, ATTR_FLAGS: dict(params), ATTR_BASELINE: baseline,
                            METRIC_PREFIX + "decode.output_throughput": d, METRIC_PREFIX + "prefill.input_throughput": 600.0,
                            METRIC_PREFIX + "decode.median_ttft_ms": latency, METRIC_PREFIX + "prefill.median_ttft_ms": 10.0},
                constraints={"launch_failed": 0.0}))
    return url


def _verdicts(tmp_path: Path, url: str) -> tuple[str, dict[str, Any], str]:
    args = ["--space", str(SPACE), "--study", "q", "--storage", url]
    text = kttune("best", *args)
    data = kttune("best", *args, "--format", "json")
    report = kttune("report", *args, "--out", str(tmp_path / "report"))
    assert text.returncode == data.returncode == report.returncode == 0, text.stderr + data.stderr + report.stderr
    import json

    return text.stdout, json.loads(data.stdout), (tmp_path / "report" / "report.html").read_text()


def test_a_pick_within_the_noise_is_not_recommended(tmp_path: Path) -> None:
    url = _study_on_disk(tmp_path, ([45.83, 43.37], [48.5, 46.0]), (100.0, 100.0))  # +6 %, repeats 5 % apart
    text, data, html = _verdicts(tmp_path, url)
    verdict = next(ln for ln in text.splitlines() if ln.startswith("verdict: "))
    assert "no significant gain over the baseline: keep it" in verdict and "decode.output_throughput" in verdict
    assert data["recommended"] is False and "keep it" in data["verdict"]
    assert "no significant gain over the baseline: keep it" in html and " ★" not in html.split("★ = recommended")[0]


def test_a_pick_with_a_worse_unguarded_latency_is_not_recommended_and_a_clear_gain_is(tmp_path: Path) -> None:
    worse = _study_on_disk(tmp_path, ([40.0, 40.2], [60.0, 60.3]), (100.0, 180.0))  # +50 %, TTFT +80 %
    text, data, _ = _verdicts(tmp_path, worse)
    assert data["recommended"] is False and "decode.median_ttft_ms" in data["verdict"]
    clear = tmp_path / "clear"
    clear.mkdir()
    url = _study_on_disk(clear, ([40.0, 40.2], [60.0, 60.3]), (100.0, 100.0))
    text, data, html = _verdicts(clear, url)
    assert data["recommended"] is True and "beats the baseline beyond the run-to-run noise" in data["verdict"]
    assert "keep it" not in text and " ★" in html


def test_read_only_commands_work_from_storage_alone_from_another_directory(tmp_path: Path) -> None:
    """The study stores its space at its run: best/show/export/report need no --space, from any
    directory; a --space that differs from the stored one is used, with one line naming how."""
    studies = tmp_path / "studies"
    run = kttune("run", "--space", str(SPACE), "--budget", "1", "--no-compat-check", "--studies-dir", str(studies))
    assert run.returncode == 0, run.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    study = ["--study", "sim-qwen3-30b-a3b-1x4090", "--storage", f"sqlite:///{studies / 'sim-qwen3-30b-a3b-1x4090.db'}"]

    def here(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, timeout=180,
                              cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(REPO)})

    best = here("best", *study)
    assert best.returncode == 0 and "trial" in best.stdout and best.stderr == "", best.stderr
    assert here("show", "0", *study).returncode == 0
    export = here("export", *study, "--out", "best.yaml", "--keep-bench-flags")
    assert export.returncode == 0 and (elsewhere / "best.yaml").is_file(), export.stderr
    assert here("report", *study, "--out", "report").returncode == 0 and (elsewhere / "report" / "report.html").is_file()
    data = yaml.safe_load(SPACE.read_text())
    data["bench"]["timeout_s"] = 301
    changed = here("best", *study, "--space", str(write_space(tmp_path, data)))
    assert changed.returncode == 0 and changed.stderr.count("\n") == 1
    assert changed.stderr.startswith("kttune: note: --space") and "(in bench)" in changed.stderr
    none = here("best", "--studies-dir", str(studies))
    assert none.returncode == 2 and "--study NAME" in none.stderr and none.stderr.count("\n") == 1


def test_a_relative_path_not_found_names_the_directory_it_was_read_from(tmp_path: Path) -> None:
    data = yaml.safe_load(SPACE.read_text())
    (tmp_path / "sharegpt.json").write_text((REPO / data["bench"]["dataset_path"]).read_text())
    data["bench"]["dataset_path"] = "sharegpt.json"  # beside the space file, not in the current directory
    done = kttune("run", "--space", str(write_space(tmp_path, data)), "--budget", "1", "--studies-dir",
                  str(tmp_path / "studies"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("kttune: error: bench.dataset_path")
    assert f"read from the current directory {REPO}, not from the space file's folder" in done.stderr
    assert not (tmp_path / "studies").exists()


def test_a_finished_budget_says_how_to_go_on_and_export_follows_the_umask(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    args = ["--space", str(SPACE), "--budget", "1", "--no-compat-check", "--studies-dir", str(studies)]
    assert kttune("run", *args).returncode == 0
    again = kttune("run", *args)
    assert again.returncode == 0 and "already spent --budget 1" in again.stdout and "--budget 11" in again.stdout
    out = tmp_path / "best.yaml"
    done = subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "tuner.cli", "export",
                           "--space", str(SPACE), "--studies-dir", str(studies), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o644  # readable by the server's user, as `open` would make it
