"""The search space: a YAML file loaded and validated into frozen specs (params, server,
workloads, objectives, SLOs, bench, confirmation, probe, quality), the one seam to Optuna's
distributions and to launch flags."""
from tuner.config.parse import load_space, parse_space
from tuner.config.quality import QualitySpec
from tuner.config.specs import (
    AUTO,
    CAPACITY_FLAGS,
    BenchSpec,
    ConfirmSpec,
    FeasibilitySpec,
    ParamSpec,
    ProbeSpec,
    SearchSpace,
    Workload,
    is_finite,
)

__all__ = [
    "AUTO",
    "CAPACITY_FLAGS",
    "BenchSpec",
    "ConfirmSpec",
    "FeasibilitySpec",
    "ParamSpec",
    "ProbeSpec",
    "QualitySpec",
    "SearchSpace",
    "Workload",
    "is_finite",
    "load_space",
    "parse_space",
]
