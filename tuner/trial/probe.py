"""The early-stop probe workload: a shorter run of the objective's workload whose result
lets the study's pruner stop a clearly worse configuration before its full benchmark."""
from __future__ import annotations

from dataclasses import replace

from tuner.config import SearchSpace, Workload

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


