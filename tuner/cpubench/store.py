"""A sweep's files beside the study (``<studies-dir>/<study>/cpubench/``): the result as JSON
(the record `kttune run` and `kttune doctor` read), the table as text and the plot as PNG,
each written atomically; standard library only (the plot needs matplotlib, else it is skipped)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tuner.cpubench.sweep import CpuBenchResult

RESULT_FILE = "cpubench.json"


def bench_dir(studies_dir: Path, study: str) -> Path:
    return Path(studies_dir) / study / "cpubench"


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
    _atomic(path, write)


def table(result: CpuBenchResult) -> str:
    """Tokens per second of the layer per (threads, pools) and batch size, and the noise."""
    plan = result.plan
    head = ["threads", "pools", *(f"b={b}{' (prefill)' if b == plan.prefill else ''}" for b in plan.batches), "setup s"]
    rows = [head]
    for p in result.points:
        cells = ([f"{p.tokens_per_s(b):.0f}" for b in plan.batches] if p.error is None
                 else [f"failed: {p.error[:60]}", *([""] * (len(plan.batches) - 1))])
        rows.append([str(p.threads), str(p.pools), *cells, f"{p.setup_s:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"# {plan.shape.describe()}; kt-kernel {result.env.get('kt_kernel')} ({result.env.get('variant')}), "
             f"{result.env.get('cores') or '?'} cores; tokens/s of one layer"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"# noise: {100 * result.noise():.1f} % (pooled sd of one repeat's mean); {plan.repeats} repeats, "
                 f"{plan.min_time_s:g} s per batch size; sweep {result.wall_s:.0f} s wall")
    return "\n".join(lines)


def plot(result: CpuBenchResult, path: Path) -> bool:
    """Throughput against threads, a line per pool count and batch size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    plan = result.plan
    fig, axes = plt.subplots(1, len(plan.batches), figsize=(3.2 * len(plan.batches), 3.2), squeeze=False)
    for ax, b in zip(axes[0], plan.batches):
        for pools in plan.pools:
            pts = sorted((p.threads, p.tokens_per_s(b)) for p in result.ok_points() if p.pools == pools)
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=f"{pools} pool{'s' if pools > 1 else ''}")
        ax.set_title(f"batch {b}{' (prefill)' if b == plan.prefill else ''}", fontsize=9)
        ax.set_xlabel("kt-cpuinfer threads")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens/s (one layer)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(plan.shape.describe(), fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return True


def save(result: CpuBenchResult, folder: Path) -> list[Path]:
    """JSON, table and plot into `folder`; the paths written."""
    folder = Path(folder)
    out = [folder / RESULT_FILE, folder / "table.txt"]
    _write_text(out[0], json.dumps(result.to_json(), indent=1))
    _write_text(out[1], table(result) + "\n")
    if plot(result, folder / "cpubench.png"):
        out.append(folder / "cpubench.png")
    return out


def load(folder: Path) -> CpuBenchResult | None:
    """The stored result, or None when there is none; ValueError when it cannot be read."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    return CpuBenchResult.from_json(json.loads(path.read_text()))


def describe_age(result: CpuBenchResult, now: float | None = None) -> str:
    age = max(0.0, (now or time.time()) - result.created)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if age >= size:
            n = int(age // size)
            return f"{n} {unit}{'s' if n > 1 else ''} old"
    return "just made"


def doctor_row(studies_dir: Path, study: str) -> tuple[str, str, str]:
    """(status, detail, fix) of the sweep stored for `study`, for `kttune doctor`."""
    try:
        result = load(bench_dir(studies_dir, study))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return "warn", f"{bench_dir(studies_dir, study)}: unreadable ({exc})", "run kttune cpubench again"
    if result is None:
        return "skip", (f"no CPU-expert sweep for study {study} (optional: `kttune cpubench --space ...` times "
                        "kt-cpuinfer/threadpool points in minutes, no GPU; the search then skips the slow ones)"), ""
    return "ok", (f"{result.plan.shape.describe()}, {len(result.ok_points())} points, {describe_age(result)} "
                  f"(kt-kernel {result.env.get('kt_kernel')})"), ""
