"""The one place where a trial's fate becomes an Optuna verdict.

Infeasible is not FAIL: Optuna's samplers learn nothing from FAIL trials, so configurations
that do not fit (predicted, or crashed for a config reason) are told as COMPLETE with a
pessimistic value and a positive constraint. FAIL is kept for faults that say nothing
about the configuration (the bench client broke, the port was taken, the tuner was stopped).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from optuna.trial import TrialState

from tuner.config import SearchSpace, is_finite

# Failure reasons caused by the configuration itself: the sampler must learn to avoid them.
CONFIG_REASONS = frozenset({
    "oom", "oom_weights", "oom_kv_alloc", "kv_not_enough_memory", "cuda_graph_failed",
    "warmup_failed", "scheduler_exception", "scheduler_dead", "child_failed", "python_exception",
    "watchdog_timeout", "start_timeout", "server_died", "bench_incomplete", "bench_timeout",
    "infeasible_predicted", "quality",
})
# Reasons that make every later launch fail too: the study stops instead of burning budget.
FATAL_REASONS = frozenset({"unrecognized_args", "invalid_args", "kt_not_enabled", "teardown_stuck",
                           "exec_failed"})
# A server that exits with a plain code is the configuration's doing (e.g. a native crash for
# one thread layout); the loop stops if it keeps happening whatever the config.
EXIT_PREFIX = "exited_rc_"


def is_config_reason(reason: str) -> bool:
    return reason in CONFIG_REASONS or reason.startswith(EXIT_PREFIX)
# A trial stopped after its early-stop probe (Optuna PRUNED).
PRUNED = "pruned"
LAUNCH_FAILED = "launch_failed"
PESSIMISTIC_MAX = 0.0
PESSIMISTIC_MIN = 1e9


@dataclass
class TrialOutcome:
    state: TrialState
    values: list[float] | None
    reason: str | None = None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None


def objective_values(space: SearchSpace, metrics: Mapping[str, float]) -> list[float] | None:
    """The objective vector from `workload.metric` keys; None if any is missing/non-finite."""
    values = []
    for obj in space.objectives:
        v = metrics.get(obj.key)
        if not is_finite(v):
            return None
        values.append(float(v))  # type: ignore[arg-type]
    return values


def pessimistic_values(space: SearchSpace) -> list[float]:
    return [PESSIMISTIC_MAX if o.direction == "maximize" else PESSIMISTIC_MIN for o in space.objectives]


def slo_constraints(space: SearchSpace, metrics: Mapping[str, float]) -> dict[str, float] | None:
    """One constraint per SLO (≤ 0 met); None if a bounded metric was not measured."""
    out = {}
    for slo in space.slos:
        value = metrics.get(slo.key)
        if not is_finite(value):
            return None
        out[slo.constraint_name] = slo.violation(float(value))  # type: ignore[arg-type]
    return out


def success(space: SearchSpace, metrics: Mapping[str, float], constraints: Mapping[str, float]) -> TrialOutcome:
    values = objective_values(space, metrics)
    slos = slo_constraints(space, metrics)
    if values is None or slos is None:
        keys = [o.key for o in space.objectives] + [s.key for s in space.slos]
        missing = [k for k in keys if not is_finite(metrics.get(k))]
        return failure(space, "metric_missing", f"bench output lacks {', '.join(missing)}", metrics, constraints)
    return TrialOutcome(TrialState.COMPLETE, values, None, "ok", dict(metrics),
                        {**constraints, **slos, LAUNCH_FAILED: 0.0})


def failure(space: SearchSpace, reason: str, message: str, metrics: Mapping[str, float] | None = None,
            constraints: Mapping[str, float] | None = None) -> TrialOutcome:
    """Map a named failure to COMPLETE+constraint (config fault) or FAIL (infrastructure)."""
    cons = dict(constraints or {})
    if is_config_reason(reason):
        # A predicted-infeasible trial carries its own positive feasibility constraints.
        cons[LAUNCH_FAILED] = 0.0 if reason == "infeasible_predicted" else 1.0
        return TrialOutcome(TrialState.COMPLETE, pessimistic_values(space), reason, message,
                            dict(metrics or {}), cons)
    return TrialOutcome(TrialState.FAIL, None, reason, message, dict(metrics or {}), cons)
