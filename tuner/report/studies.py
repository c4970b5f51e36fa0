"""`kttune studies` (every study a storage holds: name, trials, best, storage) and
`kttune show TRIAL` (one trial as stored), read from storage only; neither creates a database."""
from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from rich import box
from rich.console import Console
from rich.table import Table

from tuner.config import ConfirmSpec, load_space
from tuner.errors import ConfigError, KttuneError
from tuner.report.status import classify_trial
from tuner.report.units import fmt_metric, fmt_seconds
from tuner.selection import pick
from tuner.storage import (
    ATTR_DUPLICATE_OF,
    ATTR_LAUNCHED,
    ATTR_MESSAGE,
    ATTR_PROBE_THRESHOLD,
    ATTR_REASON,
    ATTR_TIMINGS,
    ATTR_TRIAL_DIR,
    ATTR_WALL_S,
    METRIC_PREFIX,
    STUDY_ATTR_SPACE,
    make_storage,
    metrics_of,
    objective_keys,
)


@dataclass(frozen=True)
class StudyRow:
    name: str
    trials: int
    launched: int
    best_trial: int | None
    best: dict[str, float]  # objective key → value of the pick
    storage: str


def _is_optuna_sqlite(path: Path) -> bool:
    """Read-only look for Optuna's tables: opening any other file through Optuna would add them."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            return con.execute("select 1 from sqlite_master where type='table' and name='studies'").fetchone() is not None
    except sqlite3.Error:
        return False


def storages_in(studies_dir: Path) -> list[str]:
    """The SQLite study databases in `studies_dir` (kttune's default place for them)."""
    if not studies_dir.is_dir():
        return []
    return [f"sqlite:///{p}" for p in sorted(studies_dir.glob("*.db")) if _is_optuna_sqlite(p)]


def _confirm_of(study: optuna.Study) -> ConfirmSpec:
    """The selection settings of the space the study ran with, where that file still loads."""
    path = (study.user_attrs.get(STUDY_ATTR_SPACE) or {}).get("path")
    if path and Path(path).is_file():
        try:
            return load_space(path, check_paths=False).confirm
        except KttuneError:
            pass
    return ConfirmSpec()


def list_studies(storages: Sequence[str]) -> list[StudyRow]:
    rows = []
    for url in storages:
        store = make_storage(url)
        for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=store)
            trials = study.get_trials(deepcopy=False)
            picked = pick(study, _confirm_of(study))
            best = picked[0] if picked else None
            values = dict(zip(objective_keys(study), best.values)) if best is not None and best.values else {}
            rows.append(StudyRow(summary.study_name, len(trials), sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED)),
                                 best.number if best else None, values, url))
    return rows


def studies_json(rows: Sequence[StudyRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _short_url(url: str) -> str:
    """A SQLite URL relative to the working directory when the file is under it."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if path.is_absolute() and path.resolve().is_relative_to(Path.cwd()):
            return "sqlite:///" + str(path.resolve().relative_to(Path.cwd()))
    return url


def render_studies(rows: Sequence[StudyRow], console: Console) -> None:
    """Per storage, one row per study: trials, launches, and its best trial's objective values."""
    for url in dict.fromkeys(r.storage for r in rows):
        table = Table("study", "trials", "launched", "best", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      title=f"storage {_short_url(url)}", title_justify="left")
        for r in rows:
            if r.storage == url:
                best = "-" if r.best_trial is None else f"trial {r.best_trial}: " + ", ".join(
                    f"{k} {fmt_metric(k, v)}" for k, v in r.best.items())
                table.add_row(r.name, str(r.trials), str(r.launched), best)
        for column in table.columns:
            column.overflow = "fold"
        console.print(table)


def get_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    found = next((t for t in trials if t.number == number), None)
    if found is None:
        have = f"trials 0..{len(trials) - 1}" if trials else "no trials"
        raise ConfigError(f"TRIAL: study {study.study_name!r} has {have}; got {number}")
    return found


def trial_json(study: optuna.Study, t: FrozenTrial) -> dict[str, Any]:
    keys = objective_keys(study)
    return {"study": study.study_name, "trial": t.number, "state": t.state.name, "status": classify_trial(t),
            "params": dict(t.params), "values": dict(zip(keys, t.values)) if t.values else None,
            "constraints": dict(t.constraints), "metrics": metrics_of(t),
            "user_attrs": {k: v for k, v in t.user_attrs.items() if not k.startswith(METRIC_PREFIX)},
            "datetime_start": str(t.datetime_start) if t.datetime_start else None,
            "datetime_complete": str(t.datetime_complete) if t.datetime_complete else None}


def render_trial(study: optuna.Study, t: FrozenTrial, headline: Sequence[str], console: Console) -> None:
    """The trial's params, the `headline` metrics, constraints, phase times and its folder."""
    attrs = t.user_attrs
    head = f"study {study.study_name}, trial {t.number}: {classify_trial(t)} ({t.state.name})"
    if attrs.get(ATTR_REASON):
        head += f", {attrs[ATTR_REASON]}: {attrs.get(ATTR_MESSAGE, '')}"
    if attrs.get(ATTR_DUPLICATE_OF) is not None:
        head += f", same configuration as trial {attrs[ATTR_DUPLICATE_OF]}"
    probe, bound = t.intermediate_values.get(0), attrs.get(ATTR_PROBE_THRESHOLD)
    if probe is not None:
        head += f"; probe {probe:.4g}" + ("" if bound is None else f" against the pruner's threshold {bound:.4g}")
    console.print(head, markup=False)
    table = Table("", "", box=None, show_header=False, pad_edge=False)
    for k, v in t.params.items():
        table.add_row(k, str(v))
    metrics = metrics_of(t)
    for k in headline:  # every metric and flag: --format json
        if k in metrics:
            table.add_row(k, fmt_metric(k, metrics[k]))
    for k, v in t.constraints.items():
        table.add_row(f"constraint {k}", f"{v:+.3g}" + ("  violated" if v > 0 else ""))
    timings = attrs.get(ATTR_TIMINGS) or {}
    if timings:
        table.add_row("phases", ", ".join(f"{k.removesuffix('_s')} {fmt_seconds(v)}" for k, v in timings.items()),
                      end_section=False)
    if attrs.get(ATTR_WALL_S) is not None:
        table.add_row("wall time", fmt_seconds(attrs[ATTR_WALL_S]))
    if attrs.get(ATTR_TRIAL_DIR):
        table.add_row("files", str(attrs[ATTR_TRIAL_DIR]))
    for column in table.columns:
        column.overflow = "fold"
    console.print(table)
