"""The search space: a YAML file loaded and validated into frozen specs (params, server,
workloads, objectives, SLOs, bench, confirmation, probe, quality), the one seam to Optuna's
distributions and to launch flags."""
from __future__ import annotations

from tuner.config.fields import RESERVED_FLAGS
from tuner.config.parse import load_space, parse_space
from tuner.config.quality import QualitySpec
from tuner.config.specs import (
    AUTO,
    CAPACITY_FLAGS,
    BenchSpec,
    ConfirmSpec,
    Direction,
    FeasibilitySpec,
    ObjectiveSpec,
    ParamSpec,
    ProbeSpec,
    SearchSpace,
    ServerSpec,
    SloSpec,
    Workload,
    is_finite,
)

__all__ = [
    "AUTO",
    "BenchSpec",
    "CAPACITY_FLAGS",
    "ConfirmSpec",
    "Direction",
    "FeasibilitySpec",
    "ObjectiveSpec",
    "ParamSpec",
    "ProbeSpec",
    "QualitySpec",
    "RESERVED_FLAGS",
    "SearchSpace",
    "ServerSpec",
    "SloSpec",
    "Workload",
    "is_finite",
    "load_space",
    "parse_space",
]
