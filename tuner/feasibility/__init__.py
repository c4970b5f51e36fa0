"""Will a launch fit? sglang-kt's per-GPU memory, CPU and NUMA checks before a launch, and the
per-study gate that learns from what launched servers logged.

Modules, each importing only those before it: plan (flags with sglang's defaults),
calibration (what the memory model learned), memory (the per-GPU breakdown), anchor
(learning from a log), check (the verdict on one flag set), gate (the study's view)."""
from __future__ import annotations

from tuner.feasibility.calibration import LOWER_ACTIVATION_SHARE, without_margin_calibration
from tuner.feasibility.check import FeasibilityReport, max_gpu_experts
from tuner.feasibility.gate import FeasibilityGate, launch_flags

__all__ = [
    "FeasibilityGate",
    "launch_flags",
    "FeasibilityReport",
    "LOWER_ACTIVATION_SHARE",
    "max_gpu_experts",
    "without_margin_calibration",
]
