"""The one place where a trial's fate becomes an Optuna verdict.

Every failure has a `Reason`, and every reason one `Fault` class:

- **config** — the configuration's doing (it did not fit, crashed, hung, answered garbage):
  told as COMPLETE with a pessimistic value and a positive ``launch_failed`` constraint, so
  Optuna's samplers learn to avoid it (they learn nothing from FAIL trials). Memory failures
  are config faults that also tell the feasibility model it was too optimistic.
- **infra** — says nothing about the configuration (the bench client broke, the port was
  taken, the tuner was stopped): told as FAIL.
- **fatal** — an infra fault every later launch would hit too (an unknown flag, a server that
  cannot be executed): the study stops instead of burning its budget.

A server that exits with a plain code (``exited_rc_N``) is a config fault: a native crash for
one thread layout; the loop stops if it keeps happening whatever the configuration.

Stop rules are over classes (:func:`stop_cause`): ``streak`` launches in a row with an infra
fault of any kind stop the run, as do ``streak`` launches in a row with the same config fault
unless it is a *boundary* fault (memory, a request too long for the KV pool), which repeats
legitimately while the sampler explores the edge of what fits.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial, TrialState

from tuner.config import SearchSpace, is_finite


class Fault(enum.Enum):
    CONFIG = "config"
    INFRA = "infra"
    FATAL = "fatal"


class Reason(str, enum.Enum):
    """Stable failure names, stored in each trial's ``reason`` user attr (a plain string)."""

    fault: Fault
    memory: bool
    boundary: bool

    def __new__(cls, value: str, fault: Fault, memory: bool = False, boundary: bool = False) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.fault = fault
        member.memory = memory
        # Repeats legitimately while the sampler explores the edge of what fits.
        member.boundary = memory or boundary
        return member

    # The server ran out of GPU memory, by start-up phase (see tuner.server.logscan).
    OOM_WEIGHTS = "oom_weights", Fault.CONFIG, True
    OOM_KV_ALLOC = "oom_kv_alloc", Fault.CONFIG, True
    OOM = "oom", Fault.CONFIG, True
    KV_NOT_ENOUGH_MEMORY = "kv_not_enough_memory", Fault.CONFIG, True
    CUDA_GRAPH_FAILED = "cuda_graph_failed", Fault.CONFIG, True
    # Other ways a configuration breaks the server.
    WARMUP_FAILED = "warmup_failed", Fault.CONFIG
    SCHEDULER_EXCEPTION = "scheduler_exception", Fault.CONFIG
    SCHEDULER_DEAD = "scheduler_dead", Fault.CONFIG
    CHILD_FAILED = "child_failed", Fault.CONFIG
    PYTHON_EXCEPTION = "python_exception", Fault.CONFIG
    WATCHDOG_TIMEOUT = "watchdog_timeout", Fault.CONFIG
    START_TIMEOUT = "start_timeout", Fault.CONFIG
    SERVER_DIED = "server_died", Fault.CONFIG
    BENCH_INCOMPLETE = "bench_incomplete", Fault.CONFIG
    BENCH_TIMEOUT = "bench_timeout", Fault.CONFIG
    QUALITY = "quality", Fault.CONFIG
    # The server refused the workload's requests as too long for its KV pool or context.
    REQUEST_TOO_LONG = "request_too_long", Fault.CONFIG, False, True
    QUALITY_TIMEOUT = "quality_timeout", Fault.CONFIG
    # The server ignored the placement it was given (frequency without a recorded distribution).
    PLACEMENT_FALLBACK = "placement_fallback", Fault.CONFIG
    INFEASIBLE_PREDICTED = "infeasible_predicted", Fault.CONFIG
    # Faults that say nothing about the configuration.
    PORT_IN_USE = "port_in_use", Fault.INFRA
    BENCH_NO_RESULT = "bench_no_result", Fault.INFRA
    METRIC_MISSING = "metric_missing", Fault.INFRA
    INTERRUPTED = "interrupted", Fault.INFRA
    DUPLICATE = "duplicate", Fault.INFRA
    BUDGET_SPENT = "budget_spent", Fault.INFRA
    NOT_STARTED = "not_started", Fault.INFRA
    # No new start-up phase in the log for server.stall_timeout_s (tuner.server.logscan phases).
    # Infra, not config: a stall is the absence of evidence. A configuration that does not fit
    # fails loudly (an OOM, "Not enough memory"); what hangs silently on a real host is usually
    # the host: NCCL/P2P initialisation, weight files on slow or stuck storage, a GPU a neighbour
    # holds. Told as FAIL it teaches the sampler nothing false, and the infra streak stops a run
    # where it keeps happening instead of spending the start timeout on every launch.
    STALLED = "stalled", Fault.INFRA
    # HTTP up, but /health never 200 and no progress in the log (a slow warm-up logs its batches):
    # a server stuck behind its front end, infra for the same reason as a stall.
    UNHEALTHY = "unhealthy", Fault.INFRA
    # Faults every later launch would hit too.
    UNRECOGNIZED_ARGS = "unrecognized_args", Fault.FATAL
    INVALID_ARGS = "invalid_args", Fault.FATAL
    KT_NOT_ENABLED = "kt_not_enabled", Fault.FATAL
    TEARDOWN_STUCK = "teardown_stuck", Fault.FATAL
    EXEC_FAILED = "exec_failed", Fault.FATAL
    KERNEL_BUILD_FAILED = "kernel_build_failed", Fault.FATAL

    def __str__(self) -> str:
        return self.value


EXIT_PREFIX = "exited_rc_"
# A trial stopped after its early-stop probe (Optuna PRUNED); not a failure.
PRUNED = "pruned"
LAUNCH_FAILED = "launch_failed"
PESSIMISTIC_MAX = 0.0
PESSIMISTIC_MIN = 1e9


def fault_of(reason: str) -> Fault:
    """The class of a stored reason; an unknown one is an infrastructure fault."""
    if reason.startswith(EXIT_PREFIX):
        return Fault.CONFIG
    known = _BY_VALUE.get(reason)
    return known.fault if known is not None else Fault.INFRA


def is_config_reason(reason: str) -> bool:
    return fault_of(reason) is Fault.CONFIG


def is_fatal(reason: str | None) -> bool:
    return reason is not None and fault_of(reason) is Fault.FATAL


def is_memory_reason(reason: str | None) -> bool:
    """A failure that means the memory model was too optimistic (when it predicted a fit)."""
    return reason in _MEMORY


def is_boundary_reason(reason: str | None) -> bool:
    """A config fault that repeats legitimately near the edge of what fits (memory, KV pool)."""
    return reason in _BOUNDARY


_BY_VALUE = {r.value: r for r in Reason}
_MEMORY = frozenset(r.value for r in Reason if r.memory)
_BOUNDARY = frozenset(r.value for r in Reason if r.boundary)
# Not launches of the configuration (no server ran for it): they neither extend nor break a streak.
_NOT_A_LAUNCH = frozenset({Reason.INFEASIBLE_PREDICTED.value, Reason.DUPLICATE.value, Reason.BUDGET_SPENT.value})
DEFAULT_STREAK = 3


def stop_cause(recent: Sequence[str | None], streak: int = DEFAULT_STREAK) -> str | None:
    """Why the run must stop after these launch reasons (oldest first, None = measured), or None.

    - ``streak`` infra faults in a row, of any kinds: the environment is broken;
    - ``streak`` times in a row the same config fault that is not a boundary fault: it fails
      whatever the configuration, which is the environment again (or the space).
    A pruned launch was measured (its probe) and breaks a streak, as does a success."""
    tail = [r for r in recent if r not in _NOT_A_LAUNCH][-streak:]
    if streak < 1 or len(tail) < streak or any(r is None or r == PRUNED for r in tail):
        return None
    reasons = [str(r) for r in tail]
    if all(fault_of(r) is not Fault.CONFIG for r in reasons):
        kinds = ", ".join(dict.fromkeys(reasons))
        return f"{streak} environment faults in a row ({kinds})"
    if len(set(reasons)) == 1 and not is_boundary_reason(reasons[0]):
        return f"{streak} launches in a row failed with {reasons[0]} whatever the configuration"
    return None


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

    @property
    def why(self) -> str:
        """The failure's decisive line, the first of its message ("" when it succeeded)."""
        return "" if self.ok else decisive(self.message)


def decisive(message: str) -> str:
    """The decisive line of a stored failure message: failure messages put it first."""
    return message.strip().split("\n", 1)[0].strip() if message else ""


def objective_values(space: SearchSpace, metrics: Mapping[str, float]) -> list[float] | None:
    """The objective vector from `workload.metric` keys; None if any is missing/non-finite."""
    values = []
    for obj in space.objectives:
        v = metrics.get(obj.key)
        if v is None or not is_finite(v):
            return None
        values.append(float(v))
    return values


def pessimistic_values(space: SearchSpace) -> list[float]:
    return [PESSIMISTIC_MAX if o.direction == "maximize" else PESSIMISTIC_MIN for o in space.objectives]


def slo_constraints(space: SearchSpace, metrics: Mapping[str, float]) -> dict[str, float] | None:
    """One constraint per SLO (≤ 0 met); None if a bounded metric was not measured."""
    out = {}
    for slo in space.slos:
        value = metrics.get(slo.key)
        if value is None or not is_finite(value):
            return None
        out[slo.constraint_name] = slo.violation(float(value))
    return out


def success(space: SearchSpace, metrics: Mapping[str, float], constraints: Mapping[str, float]) -> TrialOutcome:
    values = objective_values(space, metrics)
    slos = slo_constraints(space, metrics)
    if values is None or slos is None:
        keys = [o.key for o in space.objectives] + [s.key for s in space.slos]
        missing = [k for k in keys if not is_finite(metrics.get(k))]
        return failure(space, Reason.METRIC_MISSING, f"bench output lacks {', '.join(missing)}", metrics, constraints)
    return TrialOutcome(TrialState.COMPLETE, values, None, "ok", dict(metrics),
                        {**constraints, **slos, LAUNCH_FAILED: 0.0})


def failure(space: SearchSpace, reason: str, message: str, metrics: Mapping[str, float] | None = None,
            constraints: Mapping[str, float] | None = None) -> TrialOutcome:
    """Map a named failure to COMPLETE+constraint (config fault) or FAIL (infrastructure)."""
    reason = str(reason)
    message = space.redact(message)  # server log lines and argvs may carry a secret flag's value
    cons = dict(constraints or {})
    if is_config_reason(reason):
        # A predicted-infeasible trial carries its own positive feasibility constraints.
        cons[LAUNCH_FAILED] = 0.0 if reason == Reason.INFEASIBLE_PREDICTED else 1.0
        return TrialOutcome(TrialState.COMPLETE, pessimistic_values(space), reason, message,
                            dict(metrics or {}), cons)
    return TrialOutcome(TrialState.FAIL, None, reason, message, dict(metrics or {}), cons)


def pruned(metrics: Mapping[str, float]) -> TrialOutcome:
    """A trial stopped after its probe: PRUNED, its probe metrics kept (keyed
    `<workload>-probe.*`); the loop reports the probe value as Optuna's intermediate value."""
    return TrialOutcome(TrialState.PRUNED, None, PRUNED, "probe far below the best so far; full benchmark skipped",
                        dict(metrics), {})


def duplicate(space: SearchSpace, of: FrozenTrial) -> TrialOutcome:
    """A proposal with the params of trial `of`: a pruned twin stays pruned, a finished
    measurement is reused (its values and constraints), one still running is withdrawn."""
    if of.state == TrialState.PRUNED:
        return TrialOutcome(TrialState.PRUNED, None, PRUNED, f"duplicate of pruned trial {of.number}")
    if of.state.is_finished():
        return TrialOutcome(of.state, list(of.values) if of.values else None, None,
                            f"duplicate of trial {of.number}", {}, dict(of.constraints))
    return failure(space, Reason.DUPLICATE, f"duplicate of trial {of.number}, which is still running")
