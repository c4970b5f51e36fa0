"""The report's figures: :class:`tuner.report.data.ReportData` drawn as PNG images.

Rendering only: every number shown comes from the ReportData. Figures use matplotlib's object
API on an Agg canvas (no pyplot, no global backend switch); matplotlib is the optional `report`
extra. `FIGURES` names each figure and its heading, in page order for :mod:`tuner.report.html`.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tuner.errors import KttuneError
from tuner.report.data import ReportData
from tuner.report.status import DUPLICATE, FAILED, FEASIBLE, INFEASIBLE, VIOLATES
from tuner.report.units import fmt_metric

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
MIN_CONTOUR_POINTS = 6  # fewer points give a triangulation that misleads more than it shows
C_OK, C_BAD, C_OFF, C_FRONT, C_BASE = "#1f77b4", "#ff7f0e", "#9a9a9a", "#d62728", "#2ca02c"
STATUS_LABEL = {FEASIBLE: "feasible", VIOLATES: "misses a constraint", INFEASIBLE: "did not run / crashed",
                FAILED: "failed (infrastructure)", DUPLICATE: "duplicate"}


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise KttuneError("kttune report needs matplotlib: pip install 'kttune[report]' (or pip install matplotlib)") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _numeric(values: Sequence[Any], choices: Sequence[Any] | None = None) -> tuple[list[float], list[str] | None]:
    """Values as axis positions: a categorical knob (`choices`, in the space's order) or any
    non-numeric value becomes 0..k-1 with labels; a numeric range stays as it is."""
    if choices is None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = [str(c) for c in choices] if choices is not None else []
    labels += sorted({str(v) for v in values} - set(labels), key=lambda s: (len(s), s))
    return [float(labels.index(str(v))) for v in values], labels


def plot_history(data: ReportData) -> bytes | None:
    if not any(data.measured(o.key) for o in data.objectives):
        return None
    n = len(data.objectives)
    fig = _figure(9.0, 2.9 * n)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    not_run = [r.number for r in data.trials if r.status in (INFEASIBLE, FAILED)]
    for ax, obj in zip(axes, data.objectives):
        pts = data.measured(obj.key)
        ok = [r for r in pts if r.status == FEASIBLE]
        bad = [r for r in pts if r.status == VIOLATES]
        ax.scatter([r.number for r in ok], [r.metrics[obj.key] for r in ok], color=C_OK, s=28, label="feasible", zorder=3)
        if bad:
            ax.scatter([r.number for r in bad], [r.metrics[obj.key] for r in bad], color=C_BAD, marker="x", s=36,
                       label="misses a constraint", zorder=3)
        base = [r for r in pts if r.baseline]
        if base:
            ax.scatter([r.number for r in base], [r.metrics[obj.key] for r in base], facecolor="none", edgecolor=C_BASE,
                       s=150, marker="*", linewidths=1.4, label="baseline", zorder=4)
        best: list[tuple[int, float]] = []
        pick = max if obj.direction == "maximize" else min
        for r in sorted(ok, key=lambda r: r.number):
            v = r.metrics[obj.key]
            best.append((r.number, v if not best else pick(best[-1][1], v)))
        if best:
            last = max(r.number for r in data.trials)
            xs = [b[0] for b in best] + [last]
            ax.step(xs, [b[1] for b in best] + [best[-1][1]], where="post", color=C_FRONT, lw=1.3, label="best so far")
        if not_run:
            ax.scatter(not_run, [0.02] * len(not_run), transform=ax.get_xaxis_transform(), marker="v", color=C_OFF,
                       s=22, label=f"not measured ({len(not_run)})", zorder=2)
        ax.set_ylabel(obj.key)
        ax.set_title(f"{obj.key} ({obj.direction})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    axes[-1].set_xlabel("trial number")
    fig.suptitle(f"Optimization history — {data.study_name}", fontsize=11)
    return _png(fig)


def plot_importances(data: ReportData) -> bytes | None:
    shown = [imp for imp in data.importances if imp.values]
    if not shown:
        return None
    fig = _figure(4.2 * len(shown), 0.45 * max(len(i.values) for i in shown) + 1.4)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, imp in zip(axes, shown):
        names = list(imp.values)[::-1]
        vals = [imp.values[k] for k in names]
        ax.barh(names, vals, color=C_OK)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(vals) * 1.25 if max(vals) > 0 else 1)
        ax.set_title(f"{imp.objective}\n({imp.evaluator})", fontsize=9)
        ax.set_xlabel("importance")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("Parameter importances", fontsize=11)
    return _png(fig)


def plot_slices(data: ReportData) -> bytes | None:
    params = [p for p in data.params if len({repr(r.params.get(p)) for r in data.trials if p in r.params}) > 1]
    objs = [o for o in data.objectives if data.measured(o.key)]
    if not params or not objs:
        return None
    fig = _figure(2.9 * len(params), 2.5 * len(objs) + 0.5)
    axes = fig.subplots(len(objs), len(params), squeeze=False)
    for i, obj in enumerate(objs):
        pts = [r for r in data.measured(obj.key) if all(p in r.params for p in params)]
        for j, p in enumerate(params):
            ax = axes[i][j]
            xs, labels = _numeric([r.params[p] for r in pts], data.choices.get(p))
            ok = [(x, r) for x, r in zip(xs, pts) if r.status == FEASIBLE]
            bad = [(x, r) for x, r in zip(xs, pts) if r.status == VIOLATES]
            sc = ax.scatter([x for x, _ in ok], [r.metrics[obj.key] for _, r in ok], c=[r.number for _, r in ok],
                            cmap="viridis", s=24, vmin=0, vmax=max(1, max(r.number for r in data.trials)))
            if bad:
                ax.scatter([x for x, _ in bad], [r.metrics[obj.key] for _, r in bad], color=C_BAD, marker="x", s=28)
            if labels is not None:
                ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(objs) - 1:
                ax.set_xlabel(p, fontsize=8)
            if j == 0:
                ax.set_ylabel(obj.key, fontsize=8)
    fig.colorbar(sc, ax=axes, label="trial number", shrink=0.8)
    fig.suptitle("Slices: each knob against each objective (× = misses a constraint)", fontsize=11)
    return _png(fig)


def _contour_pair(data: ReportData, key: str) -> tuple[str, str] | None:
    """The two most important knobs; without importances, the two with the most values tried."""
    imp = next((i for i in data.importances if i.objective == key and len(i.values) >= 2), None)
    if imp is not None:
        a, b = list(imp.values)[:2]
        return a, b
    tried = {p: len({repr(r.params.get(p)) for r in data.measured(key) if p in r.params}) for p in data.params}
    varying = sorted((p for p in data.params if tried[p] > 1), key=lambda p: -tried[p])
    return (varying[0], varying[1]) if len(varying) >= 2 else None


def plot_contours(data: ReportData) -> bytes | None:
    """Per objective, the two most important knobs: every measured trial (× = misses a
    constraint; the throughput surface is the same), shaded by interpolation when there are
    enough distinct points."""
    panels = []
    for obj in data.objectives:
        pair = _contour_pair(data, obj.key)
        pts = [r for r in data.measured(obj.key) if pair and pair[0] in r.params and pair[1] in r.params]
        if pair and len(pts) >= MIN_CONTOUR_POINTS:
            panels.append((obj, pair, pts))
    if not panels:
        return None
    fig = _figure(5.0 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (obj, (pa, pb), pts) in zip(axes, panels):
        xs, xl = _numeric([r.params[pa] for r in pts], data.choices.get(pa))
        ys, yl = _numeric([r.params[pb] for r in pts], data.choices.get(pb))
        zs = [r.metrics[obj.key] for r in pts]
        shaded = _tricontour(ax, xs, ys, zs)
        ok = [i for i, r in enumerate(pts) if r.status == FEASIBLE]
        bad = [i for i, r in enumerate(pts) if r.status != FEASIBLE]
        lo, hi = min(zs), max(zs)
        sc = ax.scatter([xs[i] for i in ok], [ys[i] for i in ok], c=[zs[i] for i in ok], cmap="viridis",
                        vmin=lo, vmax=hi, edgecolor="k", s=36, zorder=3)
        if bad:
            ax.scatter([xs[i] for i in bad], [ys[i] for i in bad], c=[zs[i] for i in bad], cmap="viridis",
                       vmin=lo, vmax=hi, marker="X", edgecolor="k", linewidths=0.5, s=60, zorder=3)
        fig.colorbar(sc, ax=ax, label=obj.key, shrink=0.85)
        if xl is not None:
            ax.set_xticks(range(len(xl)), xl)
        if yl is not None:
            ax.set_yticks(range(len(yl)), yl)
        ax.set_xlabel(pa, fontsize=8)
        ax.set_ylabel(pb, fontsize=8)
        ax.set_title(f"{obj.key}\n(● feasible, ✕ misses a constraint{'; shading interpolated' if shaded else ''})", fontsize=9)
    ranked = all(any(i.objective == o.key and len(i.values) >= 2 for i in data.importances) for o, _p, _t in panels)
    fig.suptitle("Two most important knobs" if ranked else "Two knobs with the most values tried\n"
                 "(importances not computed)", fontsize=11)
    return _png(fig)


def _tricontour(ax: Axes, xs: list[float], ys: list[float], zs: list[float]) -> bool:
    """Filled contours over a Delaunay triangulation in unit-scaled coordinates; skipped
    when the points are too few, collinear or degenerate (the scatter remains)."""
    from matplotlib.tri import Triangulation

    uniq = {(x, y): z for x, y, z in zip(xs, ys, zs)}
    if len(uniq) < MIN_CONTOUR_POINTS or len({x for x, _ in uniq}) < 2 or len({y for _, y in uniq}) < 2:
        return False
    (px, py), pz = zip(*uniq.keys()), list(uniq.values())
    sx, sy = (max(px) - min(px)) or 1.0, (max(py) - min(py)) or 1.0
    try:
        unit = Triangulation([(x - min(px)) / sx for x in px], [(y - min(py)) / sy for y in py])
        ax.tricontourf(Triangulation(list(px), list(py), unit.triangles), pz, levels=12, cmap="viridis", alpha=0.45)
    except (RuntimeError, ValueError):
        return False
    return True


def plot_pareto(data: ReportData) -> bytes | None:
    if not data.multi_objective:
        return None
    a, b = data.objectives[0], data.objectives[1]
    pts = [r for r in data.trials if r.status in (FEASIBLE, VIOLATES) and a.key in r.metrics and b.key in r.metrics]
    if not pts:
        return None
    fig = _figure(6.4, 4.8)
    ax = fig.subplots()
    ok = [r for r in pts if r.status == FEASIBLE and r.number not in data.front]
    bad = [r for r in pts if r.status == VIOLATES]
    front = sorted((data.row(n) for n in data.front), key=lambda r: r.metrics.get(a.key, 0.0))
    ax.scatter([r.metrics[a.key] for r in ok], [r.metrics[b.key] for r in ok], color=C_OK, s=28, label="feasible")
    if bad:
        ax.scatter([r.metrics[a.key] for r in bad], [r.metrics[b.key] for r in bad], color=C_BAD, marker="x", s=34,
                   label="misses a constraint")
    if front:
        fx, fy = [r.metrics[a.key] for r in front], [r.metrics[b.key] for r in front]
        ax.plot(fx, fy, color=C_FRONT, lw=1.2, alpha=0.7, zorder=2)
        ax.scatter(fx, fy, color=C_FRONT, s=46, label="Pareto front", zorder=3)
        for i, r in enumerate(front):  # alternate above/below: neighbours on a front sit close together
            ax.annotate(f"#{r.number}", (r.metrics[a.key], r.metrics[b.key]), textcoords="offset points",
                        xytext=(6, 6 if i % 2 == 0 else -13), fontsize=8, color=C_FRONT)
    for r in pts:
        if r.baseline:
            ax.scatter([r.metrics[a.key]], [r.metrics[b.key]], marker="*", s=180, facecolor="none",
                       edgecolor=C_BASE, linewidths=1.5, label="baseline", zorder=4)
    if data.recommended is not None and data.recommended in data.front:
        r = data.row(data.recommended)
        ax.scatter([r.metrics[a.key]], [r.metrics[b.key]], s=220, facecolor="none", edgecolor="k", linewidths=1.2,
                   label="equal-weights pick", zorder=5)
    ax.set_xlabel(f"{a.key} ({a.direction})")
    ax.set_ylabel(f"{b.key} ({b.direction})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = "Pareto front" + (f" (first two of {len(data.objectives)} objectives)" if len(data.objectives) > 2 else "")
    ax.set_title(title, fontsize=11)
    return _png(fig)


def plot_comparison(data: ReportData) -> bytes | None:
    """One bar per metric: best / baseline on a log2 axis (×2 and ×1/2 equally long, so a
    latency that grew 250-fold does not flatten the rest), green when better."""
    rows = [(c, c.baseline, c.best) for c in data.comparison if c.baseline and c.best and c.baseline > 0 and c.best > 0]
    if not rows or data.baseline == data.recommended:
        return None
    fig = _figure(8.5, 0.42 * len(rows) + 1.4)
    ax = fig.subplots()
    rows = rows[::-1]
    logs = [math.log2(best / base) for _c, base, best in rows]
    colours = []
    for c, base, best in rows:
        good = None if c.higher_is_better is None or best == base else (best > base) == c.higher_is_better
        colours.append(C_OFF if good is None else ("#1a7f37" if good else "#b42318"))
    ax.barh([c.metric for c, _base, _best in rows], logs, color=colours)
    ax.axvline(0, color="k", lw=0.8)
    lo, hi = min(0.0, *logs), max(0.0, *logs)
    span = max(hi - lo, 0.5)
    ax.set_xlim(lo - (0.9 if lo < 0 else 0.15) * span, hi + (0.9 if hi > 0 else 0.15) * span)
    _ratio_ticks(ax, span)
    for y, ((c, base, best), v) in enumerate(zip(rows, logs)):
        ax.text(v + (0.03 * span if v >= 0 else -0.03 * span), y,
                f"{fmt_metric(c.metric, base)} → {fmt_metric(c.metric, best)} ({c.change_pct:+.1f}%)",
                va="center", ha="left" if v >= 0 else "right", fontsize=8)
    ax.set_xlabel("best ÷ baseline (log scale); green = better, red = worse")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Baseline (trial {data.baseline}) vs best (trial {data.recommended}), measured", fontsize=11)
    return _png(fig)


def _ratio_ticks(ax: Axes, span: float) -> None:
    """Ticks of a log2 ratio axis: powers of 10 for wide ranges, of 2 otherwise."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    lo, hi = ax.get_xlim()
    base = 10.0 if span > math.log2(20) else 2.0
    step = math.log2(base)
    ticks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))

    def label(v: float, _pos: int) -> str:
        r = round(2 ** abs(v))
        return "×1" if r == 1 else (f"×{r:,}" if v > 0 else f"×1/{r:,}")

    ax.xaxis.set_major_formatter(FuncFormatter(label))


def plot_failures(data: ReportData) -> bytes | None:
    panels = [("trial outcomes", {STATUS_LABEL.get(k, k): v for k, v in data.status_counts.items()}),
              ("why not measured", data.failure_counts), ("constraints missed", data.violation_counts)]
    panels = [(t, d) for t, d in panels if d]
    if not panels or set(data.status_counts) <= {FEASIBLE}:
        return None
    fig = _figure(4.2 * len(panels), 0.4 * max(len(d) for _, d in panels) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, counts) in zip(axes, panels):
        items = sorted(counts.items(), key=lambda kv: kv[1])
        bars = ax.barh([k for k, _ in items], [v for _, v in items], color=C_OFF if title != "trial outcomes" else C_OK)
        ax.bar_label(bars, fontsize=8, padding=2)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("Failures and infeasibility", fontsize=11)
    return _png(fig)


FIGURES: dict[str, tuple[str, Callable[[ReportData], bytes | None]]] = {
    "history": ("Optimization history", plot_history),
    "pareto": ("Pareto front plot", plot_pareto),
    "comparison": ("Baseline vs best, change per metric", plot_comparison),
    "importance": ("Parameter importances", plot_importances),
    "slices": ("Slices: each knob against each objective", plot_slices),
    "contours": ("Contours: two knobs against each objective", plot_contours),
    "failures": ("Failures and infeasibility", plot_failures),
}
