"""The report page: one self-contained HTML file (figures embedded as PNG), report.json with
the data behind it, and each figure as a PNG file beside them.

Rendering only: every number shown comes from :class:`tuner.report.data.ReportData`; the
figures are drawn in :mod:`tuner.report.figures`.
"""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.report.data import ReportData, TrialRow
from tuner.report.figures import FIGURES, STATUS_LABEL
from tuner.report.outpath import check_out_dir
from tuner.report.units import fmt_metric, fmt_number, fmt_seconds

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .55em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.4em 0}
.scroll{overflow-x:auto}.good{color:#1a7f37}.bad{color:#b42318}.muted{color:#777}"""


def _e(v: Any) -> str:
    if isinstance(v, float):
        return fmt_number(v)
    return html.escape("" if v is None else str(v))


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A table; the first `left` columns are left-aligned; no header row when None."""
    if header is None:
        left = max(len(r) for r in rows) if rows else 1
    th = "" if header is None else "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c if isinstance(c, _Raw) else _e(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class='scroll'><table>{f'<tr>{th}</tr>' if th else ''}{body}</table></div>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _trial_cells(data: ReportData, r: TrialRow, keys: Sequence[str]) -> list[Any]:
    label = f"{r.number}" + (" (baseline)" if r.baseline else "") + (" ★" if r.number == data.recommended and not data.keep_baseline else "")
    return [label, *(r.params.get(p, "") for p in data.params),
            *(fmt_metric(k, r.metrics[k]) if k in r.metrics else "" for k in keys)]


def _img(images: dict[str, bytes], name: str) -> list[str]:
    if name not in images:
        return []
    heading = FIGURES[name][0]
    return [f"<p><img alt='{_e(heading)}' src='data:image/png;base64,{base64.b64encode(images[name]).decode()}'></p>"]


def render_html(data: ReportData, images: dict[str, bytes]) -> str:
    keys = [o.key for o in data.objectives]
    slo_keys = [s.split()[0] for s in data.slos if s.split()[0] not in keys]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kttune report: {_e(data.study_name)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>kttune report — study <code>{_e(data.study_name)}</code></h1>"]
    summary = [("space", data.space_name), ("trials", len(data.trials)),
               ("outcomes", ", ".join(f"{STATUS_LABEL.get(k, k)} {v}" for k, v in sorted(data.status_counts.items()))),
               ("objectives", "; ".join(f"{o.key} ({o.direction})" for o in data.objectives)),
               ("SLOs", "; ".join(data.slos) or "none"), ("wall time", fmt_seconds(data.elapsed_s))]
    parts.append(_table(None, summary))
    parts += [f'<div class="note">{_e(n)}</div>' for n in data.notes]
    # One objective: the pick alone (a repeat of it ties on the front but is the same configuration).
    shown = data.front if data.multi_objective or data.recommended is None else (data.recommended,)
    if data.front:
        parts.append(f"<h2>{'Pareto front' if data.multi_objective else 'Best trial'} (trials meeting every constraint)</h2>")
        parts.append(_table(["trial", *data.params, *keys, *slo_keys],
                            [_trial_cells(data, data.row(n), [*keys, *slo_keys]) for n in shown]))
        parts.append('<p class="muted">★ = recommended: the best trial, or on a front the equal-weights pick '
                     '(each objective rescaled to [0, 1] over the front); no star where it does not beat the baseline '
                     'beyond the run-to-run noise.</p>')
    parts += _img(images, "pareto")
    if data.comparison and data.baseline is not None and data.recommended is not None:
        parts.append(f"<h2>Baseline (trial {data.baseline}) vs best (trial {data.recommended}), measured</h2>")
        rows = []
        for c in data.comparison:
            pct = c.change_pct
            good = None if not pct or c.higher_is_better is None else (pct > 0) == c.higher_is_better
            cls = "" if good is None else ("good" if good else "bad")
            rows.append([c.metric, fmt_metric(c.metric, c.baseline), fmt_metric(c.metric, c.best),
                         _Raw(f'<span class="{cls}">{"-" if pct is None else f"{pct:+.1f}%"}</span>'),
                         c.verdict + (f" (±{c.noise_pct:.1f}%)" if c.noise_pct is not None else "")
                         + (" ⚠ not an objective, no SLO" if c.flagged else "")])
        parts.append(_table(["metric", "baseline", "best", "change", "vs run-to-run noise"], rows))
        base, best = data.row(data.baseline), data.row(data.recommended)
        parts.append(_table(["knob", "baseline", "best"], [[p, base.params.get(p, ""), best.params.get(p, "")] for p in data.params]))
        parts += _img(images, "comparison")
    for name in ("history", "importance", "slices", "contours"):
        if name in images or name == "importance":
            parts.append(f"<h2>{_e(FIGURES[name][0])}</h2>")
        parts += _img(images, name)
        if name == "importance":
            parts += [f'<p class="muted">{_e(i.objective)}: {_e(i.note)}</p>' for i in data.importances if i.note]
            used = sorted({i.evaluator for i in data.importances if i.evaluator})
            if used:
                parts.append(f'<p class="muted">Evaluator: {_e(", ".join(used))} (Optuna), over feasible measured trials.</p>')
    counts = sorted({**data.failure_counts, **data.violation_counts}.items(), key=lambda kv: -kv[1])
    if counts or "failures" in images:
        parts.append("<h2>Failures and infeasibility</h2>")
        parts += _img(images, "failures")
        if counts:
            parts.append(_table(["reason / constraint", "trials"], counts))
    parts.append("<h2>All trials</h2>")
    parts.append(_table(["trial", *data.params, *keys, *slo_keys, "status", "reason / missed", "wall"],
                        [[*_trial_cells(data, r, [*keys, *slo_keys]), r.status,
                          r.reason or ", ".join(f"{k} {v:.3g}" for k, v in r.violated.items()), fmt_seconds(r.wall_s) if r.wall_s is not None else "-"]
                         for r in data.trials]))
    parts.append("</body></html>")
    return "\n".join(parts)


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path
    images: dict[str, Path]


def write_report(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write report.html (PNGs embedded), report.json (the data) and one PNG per figure."""
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for name, (_heading, fn) in FIGURES.items():
        png = fn(data)
        if png is not None:
            images[name] = png
    paths = {}
    for name in FIGURES.keys() - images.keys():  # a figure an earlier report had must not linger
        (out_dir / f"{name}.png").unlink(missing_ok=True)
    for name, png in images.items():
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(png)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    html_path.write_text(render_html(data, images))
    json_path.write_text(json.dumps(data.to_dict(), indent=1, default=str))
    return ReportFiles(html=html_path, json=json_path, images=paths)
