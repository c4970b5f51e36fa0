"""Record, then place: the study's first launch records the expert distribution, every later
`frequency` trial reads the dump, the dump is a trial artifact, and a frequency launch without
a recording is a configuration fault (the server's silent uniform fallback)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from tests.conftest import REPO
from tuner.config import EXPERT_LOCATION_FLAG, PLACEMENT_FLAG, load_space
from tuner.loop import RunOptions, run_study
from tuner.outcome import Reason
from tuner.report.artifacts import list_artifacts
from tuner.sim.inprocess import InProcessRunner
from tuner.storage import (
    ATTR_EXPERT_DISTRIBUTION,
    ATTR_FLAGS,
    ATTR_LAUNCHED,
    ATTR_REASON,
    STUDY_ATTR_EXPERT_DISTRIBUTION,
    STUDY_ATTR_RECORDING_TRIAL,
)
from tuner.trial import TrialRun

SPACE = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20-placement.yaml"


class Recorder:
    """The in-process simulator, noting which launches were asked to record."""

    def __init__(self) -> None:
        self.inner = InProcessRunner(noise_sigma=0.0)
        self.recording: list[bool] = []

    def __call__(self, space: Any, flags: dict[str, Any], trial_dir: Path, *, on_phase: Any = None,
                 record_experts: bool = False) -> TrialRun:
        self.recording.append(record_experts)
        return self.inner(space, flags, trial_dir, on_phase=on_phase, record_experts=record_experts)


def _study(tmp_path: Path, runner: Any, budget: int) -> optuna.Study:
    space = load_space(SPACE, check_paths=False)
    storage = optuna.storages.InMemoryStorage()
    run_study(space, RunOptions(study_name="s", storage=storage, budget=budget, seed=0, studies_dir=tmp_path),
              log=lambda _m: None, runner=runner)
    return optuna.load_study(study_name="s", storage=storage)


def test_one_recording_then_frequency_trials_read_its_dump(tmp_path: Path) -> None:
    runner = Recorder()
    study = _study(tmp_path, runner, budget=6)
    assert runner.recording[0] and not any(runner.recording[1:])         # once per study, the first launch
    first = min((t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)), key=lambda t: t.number)
    dump = study.user_attrs[STUDY_ATTR_EXPERT_DISTRIBUTION]
    assert study.user_attrs[STUDY_ATTR_RECORDING_TRIAL] == first.number
    assert first.user_attrs[ATTR_EXPERT_DISTRIBUTION] == dump
    assert Path(dump).is_file() and Path(dump).parent.parent == Path(first.user_attrs["trial_dir"])
    assert any(a["filename"] == Path(dump).name for a in list_artifacts(study, first))
    freq = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED) and t.params[PLACEMENT_FLAG] == "frequency"]
    assert freq, "the recording's placement choice is tried"
    for t in freq:
        assert t.user_attrs[ATTR_FLAGS][EXPERT_LOCATION_FLAG] == dump
        assert t.user_attrs.get(ATTR_REASON) is None


def test_frequency_without_a_recording_is_a_configuration_fault(tmp_path: Path) -> None:
    space = load_space(SPACE, check_paths=False)
    params = {**(space.baseline or {}), PLACEMENT_FLAG: "frequency"}
    run = InProcessRunner(noise_sigma=0.0)(space, space.launch_flags(params), tmp_path / "t")
    assert run.outcome.reason == Reason.PLACEMENT_FALLBACK and not run.outcome.ok
    assert run.outcome.constraints.get("launch_failed") == 1.0
    assert "WITHOUT activation frequency data" in run.outcome.message
