"""`kttune run --dry-run`: the launches a run would make, with nothing launched or written.

It is `run_study` itself on an in-memory study, with a runner that prints the server argv
and each workload's bench_serving argv instead of starting them: the same baseline, warm
start, sampler, feasibility gate, duplicate and infeasibility skips. Nothing is measured, so
after the enqueued trials the sampler proposes what it proposes without measurements (a real
run's later proposals follow its measurements)."""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner import outcome
from tuner.bench import build_bench_argv
from tuner.config import SearchSpace
from tuner.log import Log
from tuner.loop.run import RunOptions, run_study
from tuner.trial import TrialRun, bench_tokenizer, probe_workload, server_argv

PREVIEW_PORT = 30000  # a real run takes a free port per trial
DRY_RUN_MESSAGE = "dry run: printed, not launched"
_TOLD = re.compile(r"^trial (\d+): ok  objective = .*")  # the loop's verdict line of a launch


class PreviewRunner:
    """A `TrialRunner` that prints what `run_trial` would start, in its order, and starts nothing."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.argvs: list[list[str]] = []

    def __call__(self, space: SearchSpace, flags: dict[str, Any], trial_dir: Path, *,
                 on_phase: Callable[[str], None] | None = None, on_probe: object = None, **_: Any) -> TrialRun:
        port = space.server.port or PREVIEW_PORT
        argv = server_argv(space, flags, port)
        self.argvs.append(argv)
        self.log("  server: " + shlex.join(space.redact(argv)))
        probe = probe_workload(space) if on_probe is not None else None
        tokenizer = bench_tokenizer(space, flags)
        for w in ([probe] if probe is not None else []) + list(space.workloads):
            bench = build_bench_argv(space.bench, w, host=space.server.host, port=port,
                                     output_file=trial_dir / f"bench-{w.name}.jsonl", tokenizer=tokenizer)
            self.log(f"  bench {w.name}: " + shlex.join(bench))
        # Told as a feasible measurement of the same value for every launch: later proposals
        # are then the sampler's around the baseline, as after a run whose launches all tie, and
        # a repeat of a printed configuration is skipped as a real run skips a measured one.
        values = outcome.pessimistic_values(space)
        return TrialRun(outcome=outcome.TrialOutcome(TrialState.COMPLETE, values, None, DRY_RUN_MESSAGE, {},
                                                     {outcome.LAUNCH_FAILED: 0.0}), argv=argv, trial_dir=trial_dir)


def dry_run(space: SearchSpace, *, budget: int, seed: int | None, log: Log = print,
            studies_dir: Path = Path("studies"), check_feasibility: bool = True) -> list[list[str]]:
    """Print the first `budget` launches of a run (server and bench argvs) and the proposals it
    skips; returns the server argvs. Launches nothing, writes nothing."""
    def preview_log(msg: str) -> None:  # nothing was measured: no verdict to show
        told = _TOLD.match(msg)
        log(f"trial {told[1]}: printed, not launched" if told else msg.replace(" (measured);", " (printed above);"))

    runner = PreviewRunner(preview_log)
    opts = RunOptions(study_name=space.name, storage=optuna.storages.InMemoryStorage(), budget=budget, seed=seed,
                      studies_dir=studies_dir, check_feasibility=check_feasibility, preview=True)
    run_study(space, opts, log=preview_log, runner=runner)
    return runner.argvs
