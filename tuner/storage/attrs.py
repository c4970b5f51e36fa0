"""tuner.storage.attrs."""
from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

ATTR_WARM_START = "warm_start"
STUDY_ATTR_WARM_STARTED = "kttune:warm_started"
ATTR_CONFIRMATION_OF = "confirmation_of"
# User-attribute keys (kttune's part of the storage schema).
ATTR_LAUNCHED = "launched"
ATTR_REASON = "reason"
ATTR_MESSAGE = "message"
ATTR_TRIAL_DIR = "trial_dir"
ATTR_WORKER = "worker"
ATTR_FLAGS = "flags"
ATTR_BASELINE = "baseline"
ATTR_DUPLICATE_OF = "duplicate_of"
ATTR_SPARE_GB = "spare_gpu_mem_gb"  # predicted GPU memory to spare at launch (without the safety margin)
ATTR_MARGINAL = "inside_margin"  # launched although predicted to fit only inside the safety margin
METRIC_PREFIX = "m:"
CONSTRAINT_PREFIX = "c:"
STUDY_ATTR_SPACE = "kttune:space"
STUDY_ATTR_CALIBRATION = "kttune:memory_calibration"


def boundary_failures(trials: list[FrozenTrial]) -> int:
    """Launches inside the safety margin (ATTR_MARGINAL) that failed for their configuration."""
    return sum(1 for t in trials if t.user_attrs.get(ATTR_MARGINAL) and t.user_attrs.get(ATTR_LAUNCHED)
               and t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_REASON))


def is_interrupted(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and bool(t.user_attrs.get(ATTR_LAUNCHED)) and \
        t.user_attrs.get(ATTR_REASON) in (None, "interrupted")


def metrics_of(t: FrozenTrial) -> dict[str, float]:
    return {k[len(METRIC_PREFIX):]: v for k, v in t.user_attrs.items() if k.startswith(METRIC_PREFIX)}


# Study attr: the output-quality reference (tuner.quality), from the first launched trial
# whose quality check passed (the baseline, normally).
STUDY_ATTR_QUALITY_REF = "kttune:quality_reference"
