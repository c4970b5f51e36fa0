"""`kttune remeasure`: the configuration is launched exactly K more times, as confirmations of
the trial, and the selection rule pools them with its earlier runs."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO
from tuner.cli import main
from tuner.config import load_space
from tuner.errors import ConfigError
from tuner.loop import RunOptions, remeasure, run_study
from tuner.selection import repeat_groups
from tuner.sim.inprocess import InProcessRunner
from tuner.storage import ATTR_CONFIRMATION_OF, ATTR_LAUNCHED

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"


def test_remeasure_adds_k_launches_of_the_configuration(tmp_path: Path) -> None:
    space = load_space(SPACE, check_paths=False)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    opts = RunOptions(study_name="r", storage=url, budget=3, seed=0, studies_dir=tmp_path, probe=False)
    runner = InProcessRunner(seed=1)
    run_study(space, opts, log=lambda _m: None, runner=runner)
    study = optuna.load_study(study_name="r", storage=url)
    target = next(t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED) and t.values)
    summary = remeasure(space, opts, target.number, 2, log=lambda _m: None, runner=runner)
    study = optuna.load_study(study_name="r", storage=url)
    added = [t for t in study.trials if t.number in summary.new_trials]
    assert len(added) == 2 and summary.launched == 5
    assert all(t.params == target.params and t.user_attrs[ATTR_CONFIRMATION_OF] == target.number for t in added)
    group = next(g for g in repeat_groups(study) if g.first.number == target.number)
    assert len(group.values) == 3


def test_remeasure_refuses_a_trial_never_launched(tmp_path: Path) -> None:
    space = load_space(SPACE, check_paths=False)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    opts = RunOptions(study_name="r", storage=url, budget=1, seed=0, studies_dir=tmp_path, probe=False)
    run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(seed=1))
    with pytest.raises(ConfigError, match="--trial: trial 99"):
        remeasure(space, opts, 99, 1, log=lambda _m: None, runner=InProcessRunner(seed=1))
    assert main(["remeasure", "--space", str(SPACE), "--study", "r", "--storage", url, "--trial", "0",
                 "--runs", "0"]) == 2
