"""kttune: an Optuna-driven configuration tuner for SGLang + KTransformers servers.

The public API is what `__all__` names; everything else under `tuner.` is internal and may
change between releases. Names load on first use, so `import tuner` (and the simulator,
`python -m tuner.sim`) stays cheap.

    from tuner import load_space, run_study, RunOptions, pick
    space = load_space("search_spaces/sim-kimi-k2-thinking-8xl20.yaml")
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # the search space
    "load_space": "tuner.config", "SearchSpace": "tuner.config",
    # running a study
    "run_study": "tuner.loop.run", "RunOptions": "tuner.loop.run", "RunSummary": "tuner.loop.run",
    "StudyStopped": "tuner.loop.run", "dry_run": "tuner.loop.preview",
    "TrialRunner": "tuner.trial.protocols", "TrialRun": "tuner.trial.launch", "run_trial": "tuner.trial.launch",
    # outcomes and the pick
    "Reason": "tuner.outcome", "Fault": "tuner.outcome", "TrialOutcome": "tuner.outcome",
    "pick": "tuner.selection",
    # storage and read-back
    "make_storage": "tuner.storage.open", "load_study": "tuner.storage.open",
    "compute_report": "tuner.report.data", "export_profile": "tuner.report.export",
    # feasibility
    "FeasibilityGate": "tuner.feasibility.gate",
    # errors
    "KttuneError": "tuner.errors", "ConfigError": "tuner.errors",
}
__all__ = [
    "__version__",
    "load_space",
    "SearchSpace",
    "run_study",
    "RunOptions",
    "RunSummary",
    "StudyStopped",
    "dry_run",
    "TrialRunner",
    "TrialRun",
    "run_trial",
    "Reason",
    "Fault",
    "TrialOutcome",
    "pick",
    "make_storage",
    "load_study",
    "compute_report",
    "export_profile",
    "FeasibilityGate",
    "KttuneError",
    "ConfigError",
]

if TYPE_CHECKING:
    from tuner.config import SearchSpace, load_space
    from tuner.errors import ConfigError, KttuneError
    from tuner.feasibility import FeasibilityGate
    from tuner.loop import RunOptions, RunSummary, StudyStopped, dry_run, run_study
    from tuner.outcome import Fault, Reason, TrialOutcome
    from tuner.report import compute_report, export_profile
    from tuner.selection import pick
    from tuner.storage import load_study, make_storage
    from tuner.trial import TrialRun, TrialRunner, run_trial


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
