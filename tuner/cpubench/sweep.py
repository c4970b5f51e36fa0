"""The CPU-expert sweep: one worker process per (threads, pools) point, each timing one MoE
layer of the model's shape at every batch size, read back from its tagged lines.

Standard library only, so ``python -m tuner.cpubench`` runs in a serving machine's Python
without kttune's own dependencies. The worker (:mod:`tuner.cpubench.worker`) runs in
``python`` (the space's ``server.python``); a simulated space's worker is the simulator's CPU
model (``tuner.sim.cpubench``), which prints the same lines.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuner.cpubench.worker import METHODS, TAG
from tuner.errors import ConfigError, KttuneError

WORKER_FILE = Path(__file__).with_name("worker.py")
SCHEMA = 1


@dataclass(frozen=True)
class Shape:
    """One routed-expert MoE layer: what config.json says and how the experts are stored."""

    method: str
    experts: int
    top_k: int
    hidden: int
    inter: int

    def describe(self) -> str:
        return f"{self.method}: {self.experts} experts, top-{self.top_k}, hidden {self.hidden}, moe_intermediate {self.inter}"


@dataclass(frozen=True)
class SweepPlan:
    shape: Shape
    threads: tuple[int, ...]
    pools: tuple[int, ...]
    batches: tuple[int, ...]          # decode batch sizes and the prefill chunk, ascending
    prefill: int | None = None        # which of `batches` is the prefill chunk
    repeats: int = 3
    min_time_s: float = 0.6           # timed calls per batch size, over all repeats
    distinct: int = 4                 # distinct experts in memory (the rest alias them)
    timeout_s: float = 300.0          # per point

    def points(self) -> list[tuple[int, int]]:
        """(threads, pools) with at least one thread per pool."""
        return [(t, p) for p in self.pools for t in self.threads if t >= p]


@dataclass(frozen=True)
class Point:
    threads: int
    pools: int
    seconds: Mapping[int, tuple[float, ...]]   # batch → per-call seconds, one mean per repeat
    setup_s: float = 0.0
    wall_s: float = 0.0
    error: str | None = None

    def mean_s(self, batch: int) -> float:
        s = self.seconds[batch]
        return sum(s) / len(s)

    def tokens_per_s(self, batch: int) -> float:
        return batch / self.mean_s(batch)


@dataclass(frozen=True)
class CpuBenchResult:
    plan: SweepPlan
    points: tuple[Point, ...]
    env: Mapping[str, Any]             # kt-kernel version, variant, python, cores, worker kind
    created: float = field(default_factory=time.time)
    wall_s: float = 0.0

    def ok_points(self) -> list[Point]:
        return [p for p in self.points if p.error is None]

    def noise(self) -> float:
        """Pooled relative standard deviation of one repeat's mean (all points and batches)."""
        num, den = 0.0, 0
        for p in self.ok_points():
            for s in p.seconds.values():
                if len(s) > 1:
                    m = sum(s) / len(s)
                    num += sum((x / m - 1) ** 2 for x in s)
                    den += len(s) - 1
        return math.sqrt(num / den) if den else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "plan": {**asdict(self.plan), "shape": asdict(self.plan.shape)},
                "points": [{**asdict(p), "seconds": {str(b): list(s) for b, s in p.seconds.items()}} for p in self.points],
                "env": dict(self.env), "created": self.created, "wall_s": self.wall_s}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CpuBenchResult:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"cpubench result schema {data.get('schema')!r}, this kttune reads {SCHEMA}")
        plan = dict(data["plan"])
        shape = Shape(**plan.pop("shape"))
        plan = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()}
        points = tuple(Point(int(p["threads"]), int(p["pools"]), {int(b): tuple(s) for b, s in p["seconds"].items()},
                             float(p.get("setup_s", 0.0)), float(p.get("wall_s", 0.0)), p.get("error"))
                       for p in data["points"])
        return cls(SweepPlan(shape, **plan), points, dict(data.get("env") or {}), float(data["created"]),
                   float(data.get("wall_s", 0.0)))


class CpuBenchUnavailable(ConfigError):
    """The worker cannot run here (no kt-kernel, or no kernel for the method): one line, exit 2."""


Runner = Callable[[Sequence[str], Mapping[str, str], float], "tuple[int | None, str]"]


def run_process(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> tuple[int | None, str]:
    """argv in its own session, stdout+stderr; on timeout the whole group is killed (rc None)."""
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    except OSError as exc:
        return 127, f"{type(exc).__name__}: {exc}"
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


def tagged(out: str) -> list[dict[str, Any]]:
    lines = []
    for line in out.splitlines():
        if line.startswith(TAG):
            try:
                lines.append(json.loads(line[len(TAG):]))
            except ValueError:
                continue
    return lines


def _last_line(out: str) -> str:
    rest = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.startswith(TAG)]
    return rest[-1][-200:] if rest else "(no output)"


@dataclass(frozen=True)
class Worker:
    """How a point runs: the argv prefix before ``MODE JSON`` and its environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)   # added to every spec (the simulator's scenario)

    @classmethod
    def kt_kernel(cls, python: str, env: Mapping[str, str] | None = None) -> Worker:
        # One OpenMP/BLAS thread for numpy and torch: the workers are kt-kernel's own.
        return cls((python, str(WORKER_FILE)), {"OMP_NUM_THREADS": "1", **(env or {})})

    def call(self, mode: str, spec: Mapping[str, Any], timeout_s: float, run: Runner) -> tuple[int | None, str]:
        return run([*self.argv, mode, json.dumps({**spec, **self.extra})], self.env, timeout_s)


def probe(worker: Worker, method: str, *, timeout_s: float = 300.0, run: Runner = run_process) -> dict[str, Any]:
    """kt-kernel's version and variant in the worker's Python; `CpuBenchUnavailable` naming the
    problem and the fix where it has no kt-kernel or no kernel for `method`."""
    if method.upper() not in METHODS:
        raise CpuBenchUnavailable(f"kt-method: cpubench times {', '.join(METHODS)}, got {method}; "
                                  "fix: pass --method with one of them for a comparable layer")
    rc, out = worker.call("probe", {"method": method}, timeout_s, run)
    lines = tagged(out)
    info = lines[-1] if lines else {}
    if info.get("kind") == "no_kt_kernel" or not lines:
        why = info.get("error") or (f"timed out after {timeout_s:g}s" if rc is None else f"exited {rc}: {_last_line(out)}")
        raise CpuBenchUnavailable(f"server.python {worker.argv[0]}: kt-kernel cannot be imported ({why}); fix: "
                                  "pip install kt-kernel (and torch) there, or run scripts/setup.sh for .venv-kt")
    if not info.get("class"):
        raise CpuBenchUnavailable(
            f"kt-method {method.upper()}: kt-kernel {info.get('kt_kernel')} loaded its {info.get('variant')} build on this "
            f"CPU, which has no {' or '.join(METHODS[method.upper()][0])}; fix: run cpubench on the serving machine "
            "(AMX methods need a Xeon with AMX or AVX-512), or pass --method BF16")
    return info


def run_point(worker: Worker, plan: SweepPlan, threads: int, pools: int, *, run: Runner = run_process) -> Point:
    spec = {**asdict(plan.shape), "threads": threads, "pools": pools, "batches": list(plan.batches),
            "max_len": max(plan.batches), "prefill": plan.prefill, "repeats": plan.repeats, "min_time_s": plan.min_time_s,
            "distinct": plan.distinct, "seed": threads * 31 + pools}
    started = time.monotonic()
    rc, out = worker.call("point", spec, plan.timeout_s, run)
    wall = time.monotonic() - started
    lines = tagged(out)
    seconds = {int(x["batch"]): tuple(float(s) for s in x["seconds"]) for x in lines if x.get("kind") == "batch"}
    setup = next((float(x.get("setup_s", 0.0)) for x in lines if x.get("kind") == "setup"), 0.0)
    error = next((str(x["error"]) for x in lines if "error" in x), None)
    if error is None and (rc != 0 or set(seconds) != set(plan.batches)):
        error = f"timed out after {plan.timeout_s:g}s" if rc is None else f"exited {rc}: {_last_line(out)}"
    return Point(threads, pools, seconds, setup, wall, error)


def run_sweep(worker: Worker, plan: SweepPlan, *, log: Callable[[str], None] = print,
              run: Runner = run_process) -> CpuBenchResult:
    """Every point of `plan`, one process each; a point that fails is kept with its error."""
    if not plan.points():
        raise ConfigError("cpubench: no (threads, pools) point with at least one thread per pool; widen --threads")
    started = time.monotonic()
    env = {**probe(worker, plan.shape.method, run=run), "worker": " ".join(worker.argv)}
    env.pop("classes", None)
    log(f"cpubench: {plan.shape.describe()} on kt-kernel {env.get('kt_kernel')} ({env.get('variant')}), "
        f"{len(plan.points())} points × batches {', '.join(map(str, plan.batches))}")
    points = []
    for n, (t, p) in enumerate(plan.points(), 1):
        point = run_point(worker, plan, t, p, run=run)
        points.append(point)
        what = point.error or " ".join(f"{b}:{point.tokens_per_s(b):.0f}" for b in plan.batches)
        log(f"  [{n}/{len(plan.points())}] threads {t} pools {p}: {what} ({point.wall_s:.1f} s)")
    if not any(p.error is None for p in points):
        raise KttuneError(f"cpubench: every point failed, the first: {points[0].error}")
    return CpuBenchResult(plan, tuple(points), env, wall_s=time.monotonic() - started)


def parse_ints(field_name: str, text: str) -> tuple[int, ...]:
    """``"1-15"``, ``"16,24,32"`` or ``"1-4,8"`` → sorted positive ints; ConfigError naming the field."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"{field_name}: give numbers and ranges like 1-15 or 16,24,32; got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{field_name}: give positive numbers like 1-15 or 16,24,32; got {text!r}")
    return tuple(sorted(values))
