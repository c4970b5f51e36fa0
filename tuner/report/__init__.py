"""Reading a study back, from storage alone: `kttune best` tables, `kttune export` profiles,
`kttune report` data and its HTML/PNG rendering, trial files as Optuna artifacts and the
dashboard note."""
from __future__ import annotations

from tuner.report.artifacts import note_baseline_and_best, prepare_dashboard, try_upload_trial_artifacts
from tuner.report.data import compute_report
from tuner.report.export import export_profile, parse_weights
from tuner.report.html import write_report
from tuner.report.text import print_best

__all__ = [
    "compute_report",
    "export_profile",
    "note_baseline_and_best",
    "parse_weights",
    "prepare_dashboard",
    "print_best",
    "try_upload_trial_artifacts",
    "write_report",
]
