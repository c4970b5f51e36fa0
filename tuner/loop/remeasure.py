"""`kttune remeasure`: re-launch one measured configuration K times and add the runs to its
study as confirmations of it, which the selection rule pools with its earlier measurements."""
from __future__ import annotations

from dataclasses import replace

import optuna

from tuner.config import SearchSpace
from tuner.errors import ConfigError
from tuner.log import Log
from tuner.loop.run import RunOptions, RunSummary, run_study
from tuner.search import enqueue_confirmations
from tuner.storage import launched_count, load_study
from tuner.trial import TrialRunner, run_trial


def remeasure(space: SearchSpace, opts: RunOptions, trial_number: int, runs: int, *, log: Log = print,
              runner: TrialRunner = run_trial) -> RunSummary:
    """Launch trial `trial_number`'s configuration `runs` more times in its study (the budget
    grows by exactly those launches; no other proposal, no probe, no end-of-budget confirmations)."""
    if runs < 1:
        raise ConfigError(f"--runs: must be ≥ 1, got {runs}")
    study = (load_study(opts.study_name, opts.storage) if isinstance(opts.storage, str)
             else optuna.load_study(study_name=opts.study_name, storage=opts.storage))
    try:
        target = enqueue_confirmations(study, trial_number, runs)
    except ValueError as exc:
        raise ConfigError(f"--trial: {exc}") from exc
    log(f"re-launching trial {target.number}'s configuration {runs} time(s)")
    budget = launched_count(study.get_trials(deepcopy=False)) + runs
    return run_study(space, replace(opts, budget=budget, confirm=0, probe=False), log=log, runner=runner)
