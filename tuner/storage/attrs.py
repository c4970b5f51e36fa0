"""kttune's part of the storage schema: every user-attribute name and the readers of them.

Optuna's RDB storage is the system of record; what kttune adds lives in trial and study user
attributes under these names (optuna-dashboard shows them, and `optuna` CLI users see them).
Renaming one breaks resuming studies written before, so a name here is a stored format.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

# Trial user attributes.
ATTR_LAUNCHED = "launched"  # a server was started for this trial (it counts against the budget)
ATTR_REASON = "reason"  # failure reason (tuner.outcome.Reason), None when measured
ATTR_MESSAGE = "message"
ATTR_TRIAL_DIR = "trial_dir"  # server.log, bench JSONL, argv
ATTR_WORKER = "worker"  # host:pid of the worker that runs it
ATTR_FLAGS = "flags"  # the launch flags, `auto` values resolved
ATTR_BASELINE = "baseline"
ATTR_DUPLICATE_OF = "duplicate_of"
ATTR_WARM_START = "warm_start"
ATTR_CONFIRMATION_OF = "confirmation_of"  # a re-measurement of that trial's configuration
ATTR_SPARE_GB = "spare_gpu_mem_gb"  # predicted GPU memory to spare at launch (without the safety margin)
# predicted GPU memory its forwards take beyond start-up (activations, layerwise slot, what
# failures added; no margin): against what start-up left free, its memory to spare at run time
ATTR_RUNTIME_NEED_GB = "runtime_need_gb"
ATTR_MARGINAL = "inside_margin"  # launched although predicted to fit only inside the safety margin
ATTR_ARGV = "argv"
ATTR_TIMINGS = "timings"  # seconds per phase: ready_s, quality_s, bench_<workload>_s, teardown_s
# Memory figures the server reported (tuner.server.parse_memory_lines names, GiB as printed):
# the server-info read-back's where it has them (tuner.server.memory_from_server_info), the log's
# for the rest; ``server_info_endpoint`` names the endpoint that answered.
ATTR_MEMORY = "memory"
ATTR_KV_NEED = "kv_need_tokens"  # {workload: KV tokens its offered concurrency needs at once with these flags}
ATTR_WALL_S = "wall_s"
ATTR_PREDICTED_CONSTRAINTS = "predicted_constraints"  # the feasibility prediction it was launched on
ATTR_QUALITY = "quality"  # tuner.trial.quality.QualityResult.to_attr()
ATTR_EXPERT_DISTRIBUTION = "expert_distribution"  # the dump a recording launch wrote (a path)
ATTR_RECORDING_ERROR = "recording_error"  # why a recording launch left no dump
ATTR_PROBE_THRESHOLD = "probe_threshold"  # the probe value the pruner asked of the trial
METRIC_PREFIX = "m:"  # m:<workload>.<metric>
CONSTRAINT_PREFIX = "c:"  # constraints mirrored for optuna-dashboard, which shows user attrs
# Study user attributes.
STUDY_ATTR_SPACE = "kttune:space"
STUDY_ATTR_CALIBRATION = "kttune:memory_calibration"  # tuner.feasibility.FeasibilityGate.state()
STUDY_ATTR_WARM_STARTED = "kttune:warm_started"
# The output-quality reference, from the first launched trial whose quality check passed.
STUDY_ATTR_QUALITY_REF = "kttune:quality_reference"
# The study's one recording of the expert distribution: the trial that recorded (set when it is
# launched, so a study records once) and the dump file it left (what `frequency` reads).
STUDY_ATTR_RECORDING_TRIAL = "kttune:expert_recording_trial"
STUDY_ATTR_EXPERT_DISTRIBUTION = "kttune:expert_distribution"
STUDY_ATTR_ARTIFACT_DIR = "kttune:artifact_dir"
# The server found before the first launch (tuner.preflight.ServerDialect.to_attr): dialect,
# package, version, interpreter, server-info endpoint, simulated.
STUDY_ATTR_SERVER = "kttune:server"


def metrics_of(t: FrozenTrial) -> dict[str, float]:
    """The trial's measured metrics, keyed `<workload>.<metric>`."""
    return {k[len(METRIC_PREFIX):]: v for k, v in t.user_attrs.items() if k.startswith(METRIC_PREFIX)}


def objective_keys(study: optuna.Study) -> list[str]:
    """The objectives' `workload.metric` keys as the run stored them (placeholders if not)."""
    keys = (study.user_attrs.get(STUDY_ATTR_SPACE) or {}).get("objectives") or []
    return list(keys) if len(keys) == len(study.directions) else [f"objective {i}" for i in range(len(study.directions))]


def timings_of(t: FrozenTrial) -> dict[str, float]:
    return dict(t.user_attrs.get(ATTR_TIMINGS) or {})


def wall_s_of(t: FrozenTrial) -> float | None:
    """The launch's wall time in seconds; None for trials not launched."""
    v = t.user_attrs.get(ATTR_WALL_S)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def is_interrupted(t: FrozenTrial) -> bool:
    """A launch cut short by the tuner's own death (not the configuration's fault)."""
    return t.state == TrialState.FAIL and bool(t.user_attrs.get(ATTR_LAUNCHED)) and \
        t.user_attrs.get(ATTR_REASON) in (None, "interrupted")


def is_measured(t: FrozenTrial) -> bool:
    """A trial with a measurement: COMPLETE without a failure reason (a reused duplicate too)."""
    return t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_REASON) is None


def boundary_failures(trials: Sequence[FrozenTrial]) -> int:
    """Launches inside the safety margin (ATTR_MARGINAL) that failed for their configuration."""
    return sum(1 for t in trials if t.user_attrs.get(ATTR_MARGINAL) and t.user_attrs.get(ATTR_LAUNCHED)
               and t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_REASON))
