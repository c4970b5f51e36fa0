"""`kttune best`: the picked trial(s) as a table with each workload's headline metrics, and
notes on picks launched inside the safety margin."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from tuner.config import ConfirmSpec, SearchSpace
from tuner.report.status import failure_counts, no_feasible_message
from tuner.selection import (
    pick,
    repeat_groups,
)
from tuner.storage import ATTR_BASELINE, ATTR_LAUNCHED, ATTR_MARGINAL, load_study, metrics_of

SHOWN_METRICS = ("output_throughput", "input_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _repeats_note(study: optuna.Study, t: FrozenTrial) -> str:
    g = next((g for g in repeat_groups(study) if g.first.number == t.number), None)
    return "" if g is None or len(g.values) < 2 else f" (mean {g.mean:.4g} ± {g.spread:.2g} of {len(g.values)})"


def best_table(space: SearchSpace, study: optuna.Study) -> list[list[str]]:
    """Rows (header first) for the feasible best trial(s), computed, not printed."""
    best = pick(study, space.confirm)
    keys = [o.key for o in space.objectives]
    extra = [k for k in headline_metrics(space) if k not in keys]
    params = [p.flag for p in space.params]
    rows = [["trial", *params, *keys, *extra]]
    for t in best:
        m = metrics_of(t)
        rows.append([str(t.number) + (" (baseline)" if t.user_attrs.get(ATTR_BASELINE) else "") + _repeats_note(study, t),
                     *(_fmt(t.params.get(p, "")) for p in params),
                     *(_fmt(m.get(k, "")) for k in keys), *(_fmt(m.get(k, "")) for k in extra)])
    return rows


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


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_best(space: SearchSpace, study_name: str, storage: str) -> bool:
    study = load_study(study_name, storage)
    trials = study.get_trials(deepcopy=False)
    launched = sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED))
    rows = best_table(space, study)
    title = "Pareto front" if len(space.objectives) > 1 else "best trial"
    print(f"study {study_name}: {len(trials)} trials, {launched} launched")
    fails = failure_counts(study)
    if fails:
        print("not measured: " + ", ".join(f"{k} ×{v}" for k, v in sorted(fails.items())))
    if space.slos:
        print("SLOs: " + "; ".join(s.describe() for s in space.slos))
    if len(rows) == 1:
        print(no_feasible_message(study))
        return False
    print(f"{title}:")
    print(_render(rows))
    for line in boundary_notes(study, space.confirm):
        print(line)
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
