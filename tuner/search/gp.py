"""The strategy's recommendation: the measured trial with the best Gaussian-process
posterior mean over the launches (robust to one lucky run)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.config import SearchSpace
from tuner.search.grid import _index, _ordered, param_grid
from tuner.selection import _feasible
from tuner.storage.attrs import ATTR_LAUNCHED


def recommend(study: optuna.Study, space: SearchSpace) -> FrozenTrial | None:
    """The measured trial the strategy believes best: with one objective and three or more
    measurements, the highest Gaussian-process posterior mean (robust to a lucky run);
    otherwise the best measurement. None before any feasible measurement."""
    measured = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
                and t.user_attrs.get(ATTR_LAUNCHED) and t.values is not None and _feasible(t)]
    if not measured:
        return None
    if len(study.directions) > 1:
        return measured[0] if len(measured) == 1 else max(measured, key=lambda t: t.values[0])
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return denoised_best({p.flag: param_grid(p) for p in space.params}, measured, sign)


def denoised_best(grids: Mapping[str, Sequence[Any]], measured: Sequence[FrozenTrial], sign: float) -> FrozenTrial:
    if len(measured) < 3:
        return max(measured, key=lambda t: sign * t.values[0])
    x = np.asarray([encode(grids, t.params) for t in measured])
    y = np.asarray([_signed_log(t.values[0], sign) for t in measured])
    return measured[int(np.argmax(gp_posterior_mean(x, y)))]


def encode(grids: Mapping[str, Sequence[Any]], params: Mapping[str, Any]) -> list[float]:
    """Grid coordinates in [0, 1] (one-hot for unordered choices)."""
    out: list[float] = []
    for flag, grid in grids.items():
        v = params.get(flag)
        if _ordered(grid):
            out.append(_index(grid, v) / max(len(grid) - 1, 1) if v is not None else 0.5)
        else:
            out.extend(1.0 if v == g else 0.0 for g in grid)
    return out


def _signed_log(v: float, sign: float) -> float:
    """Throughputs and latencies vary by factors: compare them on a log scale (sign-aware)."""
    return sign * math.log(v) if v > 0 else sign * v


def gp_posterior_mean(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior mean at the training points of a GP with an RBF kernel and white noise, the
    length scale and noise level chosen by marginal likelihood on a small grid."""
    sd = float(y.std())
    if sd <= 0 or len(y) < 2:
        return y
    z = (y - y.mean()) / sd
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    best: tuple[float, np.ndarray] | None = None
    for ell in (0.05, 0.1, 0.2, 0.4, 0.8):
        k = np.exp(-d2 / (2 * ell * ell))
        for noise in (0.003, 0.01, 0.03, 0.1, 0.3):
            try:
                chol = np.linalg.cholesky(k + noise * np.eye(len(z)))
            except np.linalg.LinAlgError:
                continue
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
            lml = -0.5 * float(z @ alpha) - float(np.log(np.diag(chol)).sum())
            if best is None or lml > best[0]:
                best = (lml, k @ alpha)
    return y if best is None else best[1] * sd + y.mean()
