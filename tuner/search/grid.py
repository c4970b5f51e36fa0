"""The grid each param is moved over (thinned when very large), snapping to it, and the
ladder of step sizes the local search walks from coarse to fine."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tuner.config import ParamSpec

GRID_CAP = 4097          # a param with more grid points is moved on a thinned grid
FLOAT_POINTS = 33        # grid of an unstepped float / log range


def param_grid(p: ParamSpec) -> list[Any]:
    """The values a param is moved over: its own grid, thinned when very large."""
    if p.choices is not None:
        return list(p.choices)
    assert p.low is not None and p.high is not None
    lo, hi = p.low, p.high
    if p.is_float:
        if p.step:
            k = int(math.floor((hi - lo) / p.step + 1e-9))
            if k + 1 <= GRID_CAP:
                return [round(lo + i * p.step, 12) for i in range(k + 1)]
        pts = np.geomspace(lo, hi, FLOAT_POINTS) if p.log else np.linspace(lo, hi, FLOAT_POINTS)
        if p.step:
            pts = lo + np.round((pts - lo) / p.step) * p.step
        return sorted({float(round(v, 12)) for v in pts})
    step = int(p.step or 1)
    count = int((hi - lo) // step) + 1
    if p.log:
        pts = np.geomspace(lo, hi, min(count, FLOAT_POINTS))
    elif count <= GRID_CAP:
        return list(range(int(lo), int(hi) + 1, step))
    else:
        pts = np.linspace(lo, hi, GRID_CAP)
    return sorted({int(lo + round((v - lo) / step) * step) for v in pts})


def _ordered(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def snap(values: Sequence[Any], target: float, *, down: bool = True) -> Any:
    """The grid value nearest `target` from below (down) or above; the end if none is."""
    nums = sorted(values)
    if down:
        below = [v for v in nums if v <= target + 1e-9]
        return below[-1] if below else nums[0]
    above = [v for v in nums if v >= target - 1e-9]
    return above[0] if above else nums[-1]


def _ladder(n: int) -> list[int]:
    """Step sizes in grid points, coarse to fine: ~n/8, halving down to 1."""
    s = max(1, round(n / 8))
    out = []
    while s > 1:
        out.append(s)
        s //= 2
    return out + [1]


def _index(grid: Sequence[Any], value: Any) -> int:
    if value in grid:
        return list(grid).index(value)
    return min(range(len(grid)), key=lambda j: abs(grid[j] - value))
