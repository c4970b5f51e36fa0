"""Which configuration to launch next: the deployment recipe as warm start, the local search
with the capacity flag on its fitting boundary, TPE for exploration, re-measurements under
noise, and the early-stop pruner."""
from __future__ import annotations

from tuner.search.gp import denoised_best
from tuner.search.grid import param_grid
from tuner.search.pruner import BelowBestPruner
from tuner.search.recipe import warm_start
from tuner.search.remeasure import enqueue_confirmations, queue_remeasurement
from tuner.search.sampler import DEFAULT_STRATEGY, Strategy, make_sampler

__all__ = [
    "BelowBestPruner",
    "DEFAULT_STRATEGY",
    "Strategy",
    "denoised_best",
    "enqueue_confirmations",
    "make_sampler",
    "param_grid",
    "queue_remeasurement",
    "warm_start",
]
