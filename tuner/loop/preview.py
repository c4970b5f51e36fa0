"""`kttune run --dry-run`: the argvs a run would launch first, with nothing launched or
written: the same strategy (baseline, warm start, then the sampler) and the same
feasibility gate as `run_study`, on an in-memory study."""
from __future__ import annotations

import shlex

import optuna

from tuner.config import SearchSpace
from tuner.feasibility import launch_flags
from tuner.log import Log
from tuner.loop.run import build_gate
from tuner.search import make_sampler, warm_start
from tuner.storage import enqueue_baseline_once
from tuner.trial import server_argv


def dry_run(space: SearchSpace, *, budget: int, seed: int | None, log: Log = print) -> list[list[str]]:
    """Print the argv of the first `budget` proposals of the strategy a run uses (baseline,
    warm start, then the sampler); launches nothing, writes nothing. Nothing is measured, so
    after the enqueued trials the proposals are the sampler's measurement-free ones."""
    gate = build_gate(space, required=False, log=lambda m: log("# " + m))
    study = optuna.create_study(directions=space.directions, sampler=make_sampler(space, seed, gate=gate))
    enqueue_baseline_once(study, space)
    warm_start(study, space, gate, log=lambda m: log("# " + m))
    argvs = []
    for i in range(budget):
        trial = study.ask(space.distributions())
        flags = launch_flags(space, trial.params, gate)
        note = ""
        if gate is not None:
            report = gate.check(flags)
            note = "" if report.feasible else f"   # predicted infeasible: {gate.summary(report)}"
        argv = server_argv(space, flags, space.server.port or 30000 + i)
        log(shlex.join(argv) + note)
        argvs.append(argv)
    return argvs
