"""Search-space configuration: the typed specs of a space file and the YAML parser that builds them.

Other packages import from here. The package depends on nothing else in kttune except
:mod:`tuner.errors`, so any layer can use it without an import cycle.
"""
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
