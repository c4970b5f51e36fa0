"""Numbers as a person reads them: latencies in ms or s, rates in tok/s or req/s with
thousands separators, never `1.381e+04`. The kind of a metric comes from its name
(`tuner.bench.metric_kind`)."""
from __future__ import annotations

import math
import sys
from typing import Any

from rich.console import Console

from tuner.bench import MetricKind, metric_kind


def fmt_number(v: float) -> str:
    """Three to four significant digits without exponent notation."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100 or v == int(v):
        return f"{v:.0f}" if v == int(v) else f"{v:.1f}"
    if a >= 1:
        return f"{v:.3g}" if a < 10 else f"{v:.1f}"
    return f"{v:.3g}" if a >= 1e-3 else f"{v:.1e}"


def fmt_ms(ms: float) -> str:
    if not math.isfinite(ms):
        return str(ms)
    if abs(ms) >= 60_000:
        m, s = divmod(ms / 1000, 60)
        return f"{int(m)}m {s:04.1f}s"
    if abs(ms) >= 1000:
        return f"{ms / 1000:.2f} s" if abs(ms) < 10_000 else f"{ms / 1000:.1f} s"
    return f"{fmt_number(ms)} ms"


def fmt_metric(key: str, v: Any) -> str:
    """`v` in the unit its metric name implies: `decode.median_itl_ms` → "13.8 s", rates → tok/s."""
    if v is None or v == "":
        return "-"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    metric = key.rsplit(".", 1)[-1]
    kind = metric_kind(key)
    if kind is MetricKind.TIME:
        return fmt_ms(float(v)) if metric.endswith("_ms") else fmt_ms(float(v) * 1000)
    if kind is MetricKind.RATE:
        unit = "req/s" if metric.startswith("request") else "tok/s"
        return f"{fmt_number(float(v))} {unit}"
    return fmt_number(float(v))


def fmt_seconds(s: float | None) -> str:
    """A duration: "0.2s", "48s", "3m07s", "1h02m"."""
    if s is None or not math.isfinite(s):
        return "?"
    if s < 10:
        return f"{max(s, 0.0):.1f}s"
    n = int(round(s))
    h, rem = divmod(n, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def text_console() -> Console:
    """The console kttune prints reports on: tables fitted to the terminal (80 columns when
    the output is not one), prose never wrapped into a pipe or a file, so `grep` and `tee` see
    whole lines."""
    return Console(highlight=False, soft_wrap=not sys.stdout.isatty())
