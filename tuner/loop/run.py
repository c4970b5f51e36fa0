"""tuner.loop.run."""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner import outcome as objective
from tuner.config.space import SearchSpace
from tuner.errors import ConfigError, KttuneError
from tuner.feasibility import LOWER_ACTIVATION_SHARE, MEMORY_REASONS, FeasibilityGate
from tuner.log import Log
from tuner.loop.progress import Progress
from tuner.outcome import FATAL_REASONS, PRUNED, TrialOutcome
from tuner.report.artifacts import note_baseline_and_best, try_upload_trial_artifacts
from tuner.search.pruner import BelowBestPruner
from tuner.search.recipe import warm_start
from tuner.search.remeasure import _queue_remeasure, leader_to_recheck, next_confirmation
from tuner.selection import best_trials
from tuner.storage.attrs import (
    ATTR_BASELINE,
    ATTR_CONFIRMATION_OF,
    ATTR_DUPLICATE_OF,
    ATTR_FLAGS,
    ATTR_LAUNCHED,
    ATTR_MARGINAL,
    ATTR_SPARE_GB,
    ATTR_TRIAL_DIR,
    ATTR_WORKER,
    STUDY_ATTR_CALIBRATION,
    STUDY_ATTR_QUALITY_REF,
    boundary_failures,
)
from tuner.storage.open import open_study
from tuner.storage.record import record
from tuner.storage.workers import _beat, _claim_launch, _Heartbeat, _heartbeat_on, _pruned_twin, enqueue_baseline_once, find_duplicate, launched_count, recover_stale_trials, worker_id
from tuner.trial.launch import run_trial
from tuner.trial.probe import probe_workload
from tuner.trial.protocols import TrialRunner


@dataclass
class RunSummary:
    study_name: str
    storage: str
    launched: int
    budget: int
    new_trials: list[int] = field(default_factory=list)
    stopped_reason: str | None = None




# Proposals that are not launched (predicted infeasible, duplicates) per launch, before we
# conclude the sampler is stuck in a region that cannot be launched.
MAX_SKIPS_PER_LAUNCH = 50


REPEAT_LIMIT = 3


class StudyStopped(KttuneError):
    """The study cannot go on (a fault every later launch would hit too)."""


@dataclass(frozen=True)
class RunOptions:
    study_name: str
    storage: str
    budget: int
    seed: int | None
    studies_dir: Path
    check_feasibility: bool = True
    # Confirmation launches at the end of the budget; None = the space's `confirm` setting.
    confirm: int | None = None
    # Early stop by a probe workload (the space's `probe` setting); False = never probe.
    probe: bool = True

    def confirm_runs(self, space: SearchSpace) -> int:
        if self.confirm is not None:
            return max(0, min(self.confirm, self.budget - 1))
        return space.confirm.runs_for(self.budget)


def _fmt_values(values: list[float] | None) -> str:
    return "-" if values is None else ", ".join(f"{v:.4g}" for v in values)


def run_study(space: SearchSpace, opts: RunOptions, *, log: Log = print,
              runner: TrialRunner = run_trial, progress: Progress | None = None) -> RunSummary:
    """Run (or resume) the study until `opts.budget` launches are done. `runner` does one
    launch; the default starts the configured server, benchmarks tools can pass another."""
    # optuna-dashboard (for the study note after each trial) takes ~2 s to import: once, before
    # the first launch, not between trials (not in a thread: concurrent imports can deadlock).
    import optuna_dashboard  # noqa: F401
    gate = FeasibilityGate.for_space(space) if opts.check_feasibility else None
    if gate is not None:
        probe = gate.find_fitting(space, seed=opts.seed or 0)
        if not probe.feasible:  # refuse before anything is written to the study
            raise ConfigError(f"space: no configuration is predicted to fit (binding: {gate.summary(probe)}); "
                              "widen the space or pass --no-feasibility")
    study = open_study(space, study_name=opts.study_name, storage=opts.storage, seed=opts.seed)
    probing = opts.probe and probe_workload(space) is not None and _accepts(runner, "on_probe")
    if probing:
        study.pruner = BelowBestPruner(space.probe.prune_below, space.probe.min_trials)
    confirm = opts.confirm_runs(space)
    recovered = recover_stale_trials(study, log)
    if recovered:
        log(f"marked {recovered} trial(s) of a dead run as interrupted")
    if enqueue_baseline_once(study, space):
        log("baseline enqueued as the first trial")
    warm_start(study, space, log)  # strategy: the deployment recipe as the next trial (tuner/strategy.py)
    if gate is not None:
        gate.restore(study.user_attrs.get(STUDY_ATTR_CALIBRATION))
    if progress is not None:
        for t in best_trials(study):  # a resumed run knows its best so far
            progress.observe(t.values)
    summary = RunSummary(opts.study_name, opts.storage, launched_count(study.get_trials(deepcopy=False)), opts.budget)
    skips = 0
    recent: list[str | None] = []
    waiting_for: list[int] = []
    while True:
        optuna.storages.fail_stale_trials(study)  # launches of dead workers: FAIL, so not counted
        trials = study.get_trials(deepcopy=False)
        summary.launched = launched_count(trials)
        if summary.launched >= opts.budget:
            running = [t.number for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(ATTR_LAUNCHED)]
            if not running or not _heartbeat_on(study):
                break
            # Other workers' launches: wait for them, since one whose worker dies is failed by
            # the heartbeat and owed again, and the last worker to finish reports the study.
            if running != waiting_for:
                log(f"budget reached; waiting for trial(s) {', '.join(map(str, running))} of other workers")
                waiting_for = running
            time.sleep(study._storage.get_heartbeat_interval())  # type: ignore[attr-defined]
            continue
        if enqueue_baseline_once(study, space):  # again: a dead worker's launch of it was lost
            log("baseline enqueued again")
        if skips > MAX_SKIPS_PER_LAUNCH * opts.budget:
            summary.stopped_reason = (f"{skips} proposals in a row could not be launched "
                                      f"({gate.last_binding if gate else 'duplicates'}); widen the space or relax it")
            break
        if summary.launched >= opts.budget - confirm:  # the finalist with the fewest measurements
            _queue_remeasure(study, lambda s: next_confirmation(s, space.confirm.finalists))
        elif confirm and space.confirm.recheck:  # a leader that leads by less than the noise
            _queue_remeasure(study, lambda s: leader_to_recheck(s, space.confirm.noise))
        trial = study.ask(space.distributions())
        trial.set_user_attr(ATTR_WORKER, worker_id())  # first: a kill from here on is recoverable on this host
        _beat(study, trial)
        confirmation_of = trial.user_attrs.get(ATTR_CONFIRMATION_OF)
        is_baseline = bool(trial.user_attrs.get(ATTR_BASELINE))
        flags = space.launch_flags(trial.params)
        if gate is not None:
            flags = gate.resolve_auto(flags)
        trial.set_user_attr(ATTR_FLAGS, {k: v for k, v in flags.items()})
        # 1. Predicted infeasible: tell the sampler without spending a launch.
        report = gate.check(flags) if gate is not None else None
        left = space.feasibility.boundary_failures - boundary_failures(study.get_trials(deepcopy=False))
        if report is not None and not gate.allows(report, left) and not is_baseline and confirmation_of is None:  # type: ignore[union-attr]
            why = gate.summary(report)  # type: ignore[union-attr]
            outcome = objective.failure(space, "infeasible_predicted", why, constraints=report.constraints)
            record(study, trial, outcome, {})
            skips += 1
            log(f"trial {trial.number}: not launched, predicted infeasible: {why}")
            continue
        constraints = report.constraints if report is not None else {}
        marginal = report is not None and gate.inside_margin(report)  # type: ignore[union-attr]
        # 2. Same params measured, or being measured by another worker: don't launch them again.
        trials = study.get_trials(deepcopy=False)
        dup = None if confirmation_of is not None else \
            find_duplicate(trials, trial.params, before=trial.number) or _pruned_twin(trials, trial.params)
        if dup is not None:
            if dup.state == TrialState.PRUNED:  # its probe said enough: don't launch it again
                outcome = TrialOutcome(TrialState.PRUNED, None, PRUNED, f"duplicate of pruned trial {dup.number}")
                if dup.intermediate_values:
                    trial.report(dup.intermediate_values[max(dup.intermediate_values)], 0)
            elif dup.state.is_finished():  # reuse the measurement
                outcome = TrialOutcome(dup.state, list(dup.values) if dup.values else None, None,
                                       f"duplicate of trial {dup.number}", {}, dict(dup.constraints))
            else:
                outcome = objective.failure(space, "duplicate", f"duplicate of trial {dup.number}, which is still running")
                log(f"trial {trial.number}: not launched, trial {dup.number} runs the same configuration")
            record(study, trial, outcome, {ATTR_DUPLICATE_OF: dup.number})
            skips += 1
            continue
        # 3. One launch of the budget that other workers may share.
        if not _claim_launch(study, trial, opts.budget):
            record(study, trial, objective.failure(space, "budget_spent", "other workers took the budget's last launches"), {})
            log(f"trial {trial.number}: not launched, other workers took the budget's last launches")
            continue
        skips = 0
        if report is not None and report.slack_without_margin_gb is not None:
            trial.set_user_attr(ATTR_SPARE_GB, round(report.slack_without_margin_gb, 3))
        if marginal:
            trial.set_user_attr(ATTR_MARGINAL, True)
            if report.fits_without_margin:  # type: ignore[union-attr]
                log(f"trial {trial.number}: inside the safety margin (predicted slack {report.slack_without_margin_gb:.2f} GB "  # type: ignore[union-attr]
                    f"without it); launching it to find the memory boundary")
            else:
                log(f"trial {trial.number}: fits only if activations are below their estimate (predicted slack "
                    f"{report.slack_with_lower_activations_gb:.2f} GB at {LOWER_ACTIVATION_SHARE:.0%} of it); launching it to "  # type: ignore[union-attr]
                    f"measure them")
        outcome, log_text = _launch(study, trial, space, flags, constraints, opts, log, summary, runner, progress,
                                    probing=probing and confirmation_of is None)
        if gate is not None:
            before = gate.state()
            after = gate.observe(log_text, flags, outcome.reason, predicted_fit=report is not None and report.feasible,
                                 inside_margin=marginal)
            if after != before:
                study.set_user_attr(STUDY_ATTR_CALIBRATION, after)
                if after["margin_gb"] != before["margin_gb"]:
                    log(f"  memory model was optimistic: margin now {after['margin_gb']:.1f} GB")
        recent.append(outcome.reason)
        first_line = outcome.message.splitlines()[0] if outcome.message else ""
        if outcome.reason in FATAL_REASONS:
            raise StudyStopped(f"trial {trial.number} failed with {outcome.reason}: {first_line}; fix the space before running again")
        if repeating_fault(recent):
            raise StudyStopped(f"the last {REPEAT_LIMIT} launches all failed with {outcome.reason} ({first_line}); "
                               "this looks like the environment, not the configurations: check server.python, "
                               "bench.python and the trial logs in " + str(opts.studies_dir / opts.study_name))
    return summary


def _accepts(runner: Any, name: str) -> bool:
    try:
        params = inspect.signature(runner).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def repeating_fault(recent: list[str | None]) -> bool:
    """The same non-memory failure on every one of the last REPEAT_LIMIT launches (memory
    failures legitimately repeat while the sampler explores a cliff)."""
    tail = recent[-REPEAT_LIMIT:]
    return (len(tail) == REPEAT_LIMIT and tail[0] is not None and len(set(tail)) == 1
            and tail[0] not in MEMORY_REASONS | {"quality", "server_died", PRUNED})


def _launch(study: optuna.Study, trial: optuna.Trial, space: SearchSpace, flags: dict[str, Any],
            constraints: dict[str, float], opts: RunOptions, log: Log,
            summary: RunSummary, runner: TrialRunner,
            progress: Progress | None = None, *, probing: bool = False) -> tuple[TrialOutcome, str]:
    trial_dir = (opts.studies_dir / opts.study_name / f"trial-{trial.number}").resolve()
    trial.set_user_attr(ATTR_TRIAL_DIR, str(trial_dir))
    trial.set_user_attr(ATTR_LAUNCHED, True)
    n = summary.launched + 1
    of = trial.user_attrs.get(ATTR_CONFIRMATION_OF)
    note = "" if of is None else f" confirmation of trial {of}:"
    if progress is not None:
        progress.trial_started(trial.number, n, opts.budget, trial.params)
        on_phase: Callable[[str], None] = progress.phase
    else:
        log(f"trial {trial.number} (launch {n}/{opts.budget}):{note} {_fmt_params(trial.params)}")
        on_phase = lambda p: log(f"  {p}")  # noqa: E731
    started = time.monotonic()
    try:
        with _Heartbeat(study, trial):
            reference = study.user_attrs.get(STUDY_ATTR_QUALITY_REF)
            extra: dict[str, Any] = {"quality_reference": reference} if reference else {}
            if probing:
                extra["on_probe"] = lambda metrics: _probe_verdict(space, trial, metrics)
            run = runner(space, flags, trial_dir, on_phase=on_phase, **extra)
    except KeyboardInterrupt:
        outcome = objective.failure(space, "interrupted", "the tuner was stopped")
        try_upload_trial_artifacts(study, trial, trial_dir, log)
        record(study, trial, outcome, {})
        raise
    outcome = run.outcome
    # What was measured overrides what was predicted: a launched trial carries the
    # prediction only as information, never as a constraint.
    attrs: dict[str, Any] = {"argv": run.argv, "timings": run.timings, "memory": run.memory,
                             "wall_s": round(time.monotonic() - started, 2),
                             "predicted_constraints": dict(constraints)}
    quality = getattr(run, "quality", None)
    if quality:
        attrs["quality"] = quality
        if quality.get("reference") and STUDY_ATTR_QUALITY_REF not in study.user_attrs:
            study.set_user_attr(STUDY_ATTR_QUALITY_REF, quality["reference"])
            log(f"  trial {trial.number} is the output-quality reference")
    try_upload_trial_artifacts(study, trial, trial_dir, log)  # before tell: finished trials are read-only
    record(study, trial, outcome, attrs)
    summary.new_trials.append(trial.number)
    verdict = "ok" if outcome.ok else f"{outcome.reason}"
    if progress is not None:
        progress.trial_finished(trial.number, verdict, outcome.values,
                                feasible=all(v <= 0 for v in outcome.constraints.values()))
    else:
        log(f"trial {trial.number}: {verdict}  objective = {_fmt_values(outcome.values)}  ({attrs['wall_s']:.1f}s)")
    try:
        note_baseline_and_best(study)
    except Exception as exc:  # a dashboard note is a convenience; never lose the trial over it
        log(f"  (dashboard note not written: {type(exc).__name__}: {exc})")
    return outcome, run.log_text()


def _probe_verdict(space: SearchSpace, trial: optuna.Trial, metrics: dict[str, float]) -> bool:
    """Report the probe as the intermediate value (step 0) and ask the study's pruner."""
    values = objective.objective_values(space, metrics)
    if values is None:
        return False
    trial.report(values[0], 0)
    return trial.should_prune()


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
