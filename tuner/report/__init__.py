"""Reading a study back, from storage alone: `kttune best` tables, `kttune export` profiles,
`kttune report` data and its HTML/PNG rendering, trial files as Optuna artifacts and the
dashboard note."""
from __future__ import annotations

from tuner.report.artifacts import note_baseline_and_best, prepare_dashboard, try_upload_trial_artifacts
from tuner.report.data import compute_report
from tuner.report.export import export_profile, parse_weights
from tuner.report.html import write_report
from tuner.report.outpath import check_out_dir, check_out_file
from tuner.report.status import failure_lines
from tuner.report.stored import space_change_note, stored_study_space
from tuner.report.studies import get_trial, list_studies, render_studies, render_trial, storages_in, studies_json, trial_json
from tuner.report.text import best_data, headline_metrics, print_best
from tuner.report.units import fmt_metric, fmt_seconds, text_console

__all__ = [
    "best_data",
    "check_out_dir",
    "check_out_file",
    "compute_report",
    "export_profile",
    "failure_lines",
    "fmt_metric",
    "fmt_seconds",
    "get_trial",
    "headline_metrics",
    "list_studies",
    "note_baseline_and_best",
    "parse_weights",
    "prepare_dashboard",
    "print_best",
    "render_studies",
    "render_trial",
    "space_change_note",
    "storages_in",
    "stored_study_space",
    "studies_json",
    "text_console",
    "trial_json",
    "try_upload_trial_artifacts",
    "write_report",
]
