"""What the loop needs of a launch: the `TrialRunner` protocol (the real `run_trial`, the
in-process simulator, test fakes)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tuner.config import SearchSpace
from tuner.trial.launch import TrialRun


class TrialRunner(Protocol):
    """One launch. Runners that check output quality (run_trial) also take
    ``quality_reference=``; it is passed only once the study has one."""

    def __call__(self, space: SearchSpace, flags: dict[str, Any], trial_dir: Path, *,
                 on_phase: Callable[[str], None] | None = None) -> TrialRun: ...
