"""The one selection rule: every command and the loop name the same trial, and the space's
`confirm.noise` (the prior run-to-run spread) reaches each of them."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO
from tuner.config import ConfirmSpec, SearchSpace, load_space
from tuner.loop.run import RunOptions, run_study
from tuner.report.artifacts import study_note
from tuner.report.data import compute_report
from tuner.report.export import export_profile
from tuner.report.text import best_table
from tuner.selection import pick
from tuner.sim.inprocess import InProcessRunner
from tuner.storage.attrs import ATTR_FLAGS, ATTR_LAUNCHED, ATTR_REASON, ATTR_SPARE_GB, METRIC_PREFIX

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"
# Two configurations with the same GPU experts, each measured twice without spread: A is 2 %
# faster, B has 2.5 GB more GPU memory to spare. A 2 % gap is a tie under a prior noise of
# 20 % (B wins on memory), a clear lead under 1 % (A wins).
A = {"kt-num-gpu-experts": 16, "kt-cpuinfer": 22, "kt-threadpool-count": 1, "chunked-prefill-size": 4096,
     "max-running-requests": 37}
B = {**A, "chunked-prefill-size": 2048}


def _study(space: SearchSpace, url: str) -> optuna.Study:
    study = optuna.create_study(study_name="pick", storage=url, directions=space.directions)
    dists = space.distributions()
    for params, value, spare in ((A, 100.0, 0.5), (A, 100.0, 0.5), (B, 98.0, 3.0), (B, 98.0, 3.0)):
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, values=[value],
            user_attrs={ATTR_LAUNCHED: True, ATTR_REASON: None, ATTR_SPARE_GB: spare, ATTR_FLAGS: space.launch_flags(params),
                        METRIC_PREFIX + "decode.output_throughput": value},
            constraints={"launch_failed": 0.0}))
    return study


@pytest.mark.parametrize(("noise", "winner"), [(0.2, B), (0.01, A)])
def test_confirm_noise_reaches_every_command_and_the_loop(tmp_path: Path, noise: float, winner: dict) -> None:
    space = replace(load_space(SPACE, check_paths=False), confirm=ConfirmSpec(noise=noise))
    url = f"sqlite:///{tmp_path / 'pick.db'}"
    study = _study(space, url)
    expected = next(t.number for t in study.trials if t.params == winner)
    assert [t.number for t in pick(study, space.confirm)] == [expected]
    # kttune best
    assert best_table(space, study)[0][1].startswith(f"{expected} ")
    # kttune export
    out, _verdict = export_profile(space, "pick", url, tmp_path / "best.yaml")
    assert f"# trial: {expected}\n" in out.read_text()
    # kttune report
    assert compute_report(space, study).recommended == expected
    # the dashboard note
    assert f"- trial {expected}:" in study_note(study, space.confirm)
    # the loop's pick: the budget is spent already, so the run only reports
    opts = RunOptions(study_name="pick", storage=url, budget=4, seed=0, studies_dir=tmp_path, check_feasibility=False)
    summary = run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(noise_sigma=0.0))
    assert summary.launched == 4 and summary.pick == [expected]
