"""One launched trial: start the server, wait until it is really ready, check its output,
run each workload, tear it down; the runner protocol the loop depends on."""
from __future__ import annotations

from tuner.trial.launch import (
    PhaseCallback,
    ProbeHook,
    TrialRun,
    bench_tokenizer,
    recording_flags,
    run_trial,
    server_argv,
    server_env,
)
from tuner.trial.probe import PROBE_SUFFIX, probe_workload
from tuner.trial.protocols import TrialRunner

__all__ = [
    "PROBE_SUFFIX",
    "PhaseCallback",
    "ProbeHook",
    "TrialRun",
    "TrialRunner",
    "bench_tokenizer",
    "probe_workload",
    "recording_flags",
    "run_trial",
    "server_argv",
    "server_env",
]
