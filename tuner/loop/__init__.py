"""`kttune run`: the ask/tell loop whose budget counts launches, one launch at a time, the
dry run, and the progress line."""
from __future__ import annotations

from tuner.loop.preview import dry_run
from tuner.loop.progress import Progress
from tuner.loop.remeasure import remeasure
from tuner.loop.run import RunOptions, RunSummary, StudyStopped, run_study

__all__ = [
    "Progress",
    "RunOptions",
    "RunSummary",
    "StudyStopped",
    "dry_run",
    "remeasure",
    "run_study",
]
