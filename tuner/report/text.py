"""`kttune best`: the picked trial(s) as a table with each workload's headline metrics, and
notes on picks launched inside the safety margin."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial
from rich import box
from rich.console import Console
from rich.table import Table

from tuner.capacity import THIN_Z
from tuner.config import ConfirmSpec, SearchSpace
from tuner.report.comparison import compare, gain_verdict
from tuner.report.status import failure_counts, no_feasible_message
from tuner.report.units import fmt_metric, fmt_number, text_console
from tuner.selection import (
    pick,
    pooled_noise,
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
    recommended, verdict = baseline_verdict(space, study)
    return {"study": study.study_name, "objectives": keys, "recommended": recommended, "verdict": verdict,
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
    out = console or text_console()
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
    verdict = baseline_verdict(space, study)[1]
    if verdict:
        out.print(f"verdict: {verdict}", markup=False)
    out.print(f"{title}:", markup=False)
    out.print(_render(rows))
    for line in [*certainty_lines(study, space.confirm), *comparison_lines(space, study),
                 *boundary_notes(study, space.confirm)]:
        out.print(line, markup=False)
    return True


def certainty_lines(study: optuna.Study, confirm: ConfirmSpec) -> list[str]:
    """How sure the pick is (single objective): its repeats and their spread against the
    measured noise, its KV pool against the workload's need, and the launches of its memory
    flags that failed."""
    picked = pick(study, confirm)
    groups = repeat_groups(study)
    g = next((g for g in groups if picked and g.first.number == picked[0].number), None)
    if g is None:
        return []
    sigma = pooled_noise(groups, confirm.noise)
    out = [f"how sure: {len(g.values)} launch(es), mean {g.mean:.4g} ± {g.spread:.2g} (half-range); "
           f"run-to-run noise {100 * sigma:.1f} % (sd)" + ("" if len(g.values) > 1 else "; measured once: "
                                                            f"`kttune remeasure --trial {g.first.number}` adds runs")]
    cap = g.capacity
    if cap is not None and cap.known:
        pools = "" if cap.best == cap.worst else f" to {cap.best}"
        out.append(f"  KV pool {cap.worst}{pools} tokens over {cap.launches} launch(es) of these memory flags, "
                   f"need {cap.need} ({100 * (cap.margin or 0):+.0f} %)"
                   + (f"; judged at the smallest pool: {g.score:.4g}" if g.judged is not None else "")
                   + ("; thin: a fresh start may not hold the need" if not cap.holds else ""))
    if g.start_spare is not None and g.low_start_spare is not None and g.free_sd is not None:
        out.append(f"  {g.start_spare:.2f} GB to spare at run time on an average start, {g.low_start_spare:.2f} GB on one "
                   f"{THIN_Z:g} sd short of the mean free memory (sd {g.free_sd:.2f} GB between launches)"
                   + ("; thin: some fresh starts would run out of memory" if g.thin_start else ""))
    if cap is not None and cap.memory_failures:
        out.append(f"  {cap.memory_failures} of {cap.launches} launch(es) with these memory flags failed for memory")
    return out


def _baseline_and_pick(space: SearchSpace, study: optuna.Study) -> tuple[FrozenTrial, FrozenTrial] | None:
    """The measured baseline and the single pick, when they differ (else nothing to compare)."""
    picked = pick(study, space.confirm)
    base = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(ATTR_BASELINE)
                 and t.values is not None and metrics_of(t)), None)
    if len(picked) != 1 or base is None or base.number == picked[0].number:
        return None
    return base, picked[0]


def baseline_verdict(space: SearchSpace, study: optuna.Study) -> tuple[bool, str]:
    """(recommended, the line saying so) for the single pick against the baseline
    (:func:`tuner.report.comparison.gain_verdict`); (True, "") with nothing to compare."""
    pair = _baseline_and_pick(space, study)
    return gain_verdict(compare(space, study, *pair)) if pair is not None else (True, "")


def comparison_lines(space: SearchSpace, study: optuna.Study) -> list[str | Table]:
    """Baseline vs the pick on every workload's throughput and latency, with a noise verdict."""
    pair = _baseline_and_pick(space, study)
    if pair is None:
        return []
    base, picked = pair[0], [pair[1]]
    rows = compare(space, study, base, picked[0])
    if not rows:
        return []
    table = [["metric", "baseline", "pick", "change vs run-to-run noise"]]
    table += [[c.metric + (" (objective)" if c.objective else ""), fmt_metric(c.metric, c.baseline),
               fmt_metric(c.metric, c.best), c.describe()]
              for c in rows]
    flagged = [c.metric for c in rows if c.flagged]
    out: list[str | Table] = [f"baseline (trial {base.number}) vs pick (trial {picked[0].number}), means over their launches:",
                              _render(table)]
    if flagged:
        out.append(f"warning: worse beyond the noise and guarded by no SLO: {', '.join(flagged)}")
    return out


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
