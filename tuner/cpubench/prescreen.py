"""Which kt-cpuinfer × kt-threadpool-count points the sweep shows to be clearly worse.

A point is ruled out when another point is faster at **every** batch size measured (the decode
batches the workloads produce and their prefill chunk) by more than ``Z`` standard errors of
the difference, the standard error coming from the sweep's own pooled repeat noise. The sweep
runs the kernels alone, without the server's own CPU threads (one per GPU rank, the scheduler):
it cannot show that taking those cores pays, so a point with more threads than ``free_cores``
never rules out one with fewer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.cpubench.sweep import CpuBenchResult, Point

Z = 3.0


@dataclass(frozen=True)
class Prescreen:
    kept: tuple[tuple[int, int], ...]                     # (threads, pools) not ruled out
    ruled_out: tuple[tuple[int, int, int, int], ...]      # (threads, pools, by threads, by pools)
    noise: float

    def values(self, index: int) -> list[int]:
        """The kept values of threads (0) or pools (1)."""
        return sorted({p[index] for p in self.kept})

    def describe(self) -> str:
        if not self.ruled_out:
            return f"no point clearly worse than another (noise {100 * self.noise:.1f} %)"
        gone = ", ".join(f"{t}/{p}" for t, p, _bt, _bp in self.ruled_out)
        return (f"ruled out (threads/pools) {gone}: slower at every batch size than another point beyond "
                f"{Z:g} standard errors (noise {100 * self.noise:.1f} %)")


def _clearly_faster(a: Point, b: Point, batches: tuple[int, ...], rel_sd: float) -> bool:
    """a faster than b at every batch size, beyond Z standard errors of the difference."""
    for q in batches:
        ta, tb = a.mean_s(q), b.mean_s(q)
        se = rel_sd * math.sqrt(ta ** 2 / len(a.seconds[q]) + tb ** 2 / len(b.seconds[q]))
        if tb - ta <= Z * se:
            return False
    return True


def prescreen(result: CpuBenchResult, *, free_cores: int | None = None) -> Prescreen:
    """The points kept and those ruled out (each with a point that beats it); failed points are
    ruled out by nobody and kept: a failure here says nothing certain about the server."""
    batches, rel_sd = result.plan.batches, result.noise()
    ok = result.ok_points()
    kept, out = [], []
    for p in result.points:
        by = None if p.error is not None else next(
            (w for w in ok if w is not p and (free_cores is None or w.threads <= max(p.threads, free_cores))
             and _clearly_faster(w, p, batches, rel_sd)), None)
        if by is None:
            kept.append((p.threads, p.pools))
        else:
            out.append((p.threads, p.pools, by.threads, by.pools))
    return Prescreen(tuple(kept), tuple(out), rel_sd)
