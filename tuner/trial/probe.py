"""The early-stop probe: a short version of the objective's workload, and the outcome of a
trial pruned after it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from optuna.trial import TrialState

from tuner.config import SearchSpace, Workload
from tuner.outcome import PRUNED, TrialOutcome

PROBE_SUFFIX = "-probe"
PROBE_MIN_OUTPUT = 8   # a probe shorter than this measures start-up, not decode: none then


def probe_workload(space: SearchSpace) -> Workload | None:
    """The early-stop probe: the single objective's workload with `space.probe.fraction` of
    its output tokens (same prompts and concurrency, so the batch the engine runs — what
    decode throughput depends on — is the full run's). None when off or not applicable."""
    frac = space.probe.fraction
    if frac <= 0 or len(space.objectives) != 1:
        return None
    w = space.workload(space.objectives[0].workload)
    out = round(w.output_len * frac)
    if out < PROBE_MIN_OUTPUT or out >= w.output_len:
        return None
    return replace(w, name=w.name + PROBE_SUFFIX, output_len=out)


def pruned_outcome(metrics: Mapping[str, float]) -> TrialOutcome:
    """A trial stopped after its probe: PRUNED, its probe value as Optuna's intermediate
    value (reported by the loop's hook), its probe metrics kept under `<workload>-probe.*`."""
    return TrialOutcome(TrialState.PRUNED, None, PRUNED, "probe far below the best so far; full benchmark skipped",
                        dict(metrics), {})
