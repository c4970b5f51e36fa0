"""`kttune best`: the picked trial(s) as a table with each workload's headline metrics, and
notes on picks launched inside the safety margin."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial
from rich import box
from rich.console import Console
from rich.table import Table

from tuner.config import ConfirmSpec, SearchSpace
from tuner.report.status import failure_counts, no_feasible_message
from tuner.report.units import fmt_metric, fmt_number
from tuner.selection import (
    pick,
    repeat_groups,
)
from tuner.storage import ATTR_BASELINE, ATTR_FLAGS, ATTR_LAUNCHED, ATTR_MARGINAL, load_study, metrics_of


def _repeats_note(study: optuna.Study, t: FrozenTrial) -> str:
    g = next((g for g in repeat_groups(study) if g.first.number == t.number), None)
    return "" if g is None or len(g.values) < 2 else f" (mean {fmt_number(g.mean)} ± {g.spread:.2g} of {len(g.values)})"


def best_table(space: SearchSpace, study: optuna.Study) -> list[list[str]]:
    """Rows (header first) for the feasible best trial(s), computed, not printed: one column per
    picked trial and one row per knob and metric, so it fits a terminal however many there are."""
    best = pick(study, space.confirm)
    keys = [o.key for o in space.objectives]
    metrics = [*keys, *(k for k in headline_metrics(space) if k not in keys)]
    rows = [["trial", *(str(t.number) + (" (baseline)" if t.user_attrs.get(ATTR_BASELINE) else "")
                        + _repeats_note(study, t) for t in best)]]
    rows += [[p.flag, *(str(t.params.get(p.flag, "")) for t in best)] for p in space.params]
    rows += [[k, *(fmt_metric(k, metrics_of(t).get(k)) for t in best)] for k in metrics]
    return rows


def best_data(space: SearchSpace, study: optuna.Study) -> dict[str, Any]:
    """`kttune best --format json`: the picked trial(s) with params, flags and metrics."""
    keys = [o.key for o in space.objectives]
    return {"study": study.study_name, "objectives": keys,
            "picked": [{"trial": t.number, "baseline": bool(t.user_attrs.get(ATTR_BASELINE)), "params": dict(t.params),
                        "values": dict(zip(keys, t.values or [])), "flags": t.user_attrs.get(ATTR_FLAGS, {}),
                        "metrics": metrics_of(t)} for t in pick(study, space.confirm)],
            "not_measured": failure_counts(study)}


def headline_metrics(space: SearchSpace) -> list[str]:
    """Per workload, what an operator reads first: its throughput (input for prefill-only
    workloads), median TTFT and, when it decodes, median ITL; plus every SLO metric."""
    out: list[str] = []
    for w in space.workloads:
        decodes = w.output_len > 1
        out += [f"{w.name}.{'output' if decodes else 'input'}_throughput", f"{w.name}.median_ttft_ms"]
        if decodes:
            out.append(f"{w.name}.median_itl_ms")
    out += [s.key for s in space.slos if s.key not in out]
    return out


def _render(rows: list[list[str]]) -> Table:
    table = Table(*rows[0], box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for r in rows[1:]:
        table.add_row(*r)
    return table


def print_best(space: SearchSpace, study_name: str, storage: str, *, console: Console | None = None) -> bool:
    out = console or Console(highlight=False)
    study = load_study(study_name, storage)
    trials = study.get_trials(deepcopy=False)
    launched = sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED))
    rows = best_table(space, study)
    title = "Pareto front" if len(space.objectives) > 1 else "best trial"
    out.print(f"study {study_name}: {len(trials)} trials, {launched} launched", markup=False)
    fails = failure_counts(study)
    if fails:
        out.print("not measured: " + ", ".join(f"{k} ×{v}" for k, v in sorted(fails.items())), markup=False)
    if space.slos:
        out.print("SLOs: " + "; ".join(s.describe() for s in space.slos), markup=False)
    if len(rows[0]) == 1:
        out.print(no_feasible_message(study), markup=False)
        return False
    out.print(f"{title}:", markup=False)
    out.print(_render(rows))
    for line in boundary_notes(study, space.confirm):
        out.print(line, markup=False)
    return True


def boundary_notes(study: optuna.Study, confirm: ConfirmSpec) -> list[str]:
    """A line per picked configuration that was launched inside the safety margin (to find the
    memory boundary): how close to the limit it runs and how often it started."""
    out = []
    groups = {g.first.number: g for g in repeat_groups(study)}
    for t in pick(study, confirm):
        same = [x for x in study.get_trials(deepcopy=False) if x.params == t.params and x.user_attrs.get(ATTR_LAUNCHED)]
        if not any(x.user_attrs.get(ATTR_MARGINAL) for x in same):
            continue
        g = groups.get(t.number)
        spare = g.spare_gb if g is not None else None
        out.append(f"note: trial {t.number} was launched inside the safety margin to find the GPU memory limit"
                   + ("" if spare is None else f" (predicted {spare:.2f} GB to spare)" if spare >= 0
                      else f" (predicted {-spare:.2f} GB short at the activation estimate, which its runs beat)")
                   + f" and started in {len(g.values) if g else 1} of {len(same)} launch(es); re-check it after "
                   "changing the driver, the CUDA/torch versions or what else runs on the GPUs")
    return out
