"""The search space: a YAML file loaded and validated into frozen specs (params, server,
workloads, objectives, SLOs, bench, confirmation, probe, quality), the one seam to Optuna's
distributions and to launch flags."""
from __future__ import annotations

from tuner.config.fields import RESERVED_FLAGS
from tuner.config.load import load_space, read_yaml, stored_space
from tuner.config.parse import parse_space
from tuner.config.quality import QualitySpec
from tuner.config.specs import (
    ACCURACY_FLAGS,
    AUTO,
    CAPACITY_FLAGS,
    ENV_PREFIX,
    EXPERT_LOCATION_FLAG,
    FREQUENCY,
    PLACEMENT_FLAG,
    PREREQUISITES,
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
    split_env,
)

__all__ = [
    "ACCURACY_FLAGS",
    "AUTO",
    "BenchSpec",
    "CAPACITY_FLAGS",
    "ConfirmSpec",
    "ENV_PREFIX",
    "EXPERT_LOCATION_FLAG",
    "FREQUENCY",
    "Direction",
    "FeasibilitySpec",
    "ObjectiveSpec",
    "PLACEMENT_FLAG",
    "PREREQUISITES",
    "ParamSpec",
    "ProbeSpec",
    "QualitySpec",
    "RESERVED_FLAGS",
    "SearchSpace",
    "ServerSpec",
    "SloSpec",
    "Workload",
    "is_finite",
    "split_env",
    "load_space",
    "parse_space",
    "read_yaml",
    "stored_space",
]
