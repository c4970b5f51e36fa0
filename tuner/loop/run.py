"""`kttune run`: propose → check feasibility → launch → benchmark → tell, until the budget
of launches is spent.

`run_study` is the loop; each proposal goes through the steps of `_Loop.step`: queue a
re-measurement when one is due, ask, turn the params into launch flags, tell without a launch
what is predicted not to fit or was measured already, claim one launch of the budget, launch
(`tuner.loop.launch`), let the feasibility model learn from the log, and stop on a fault
every later launch would hit too. One feasibility gate serves the whole run: the loop, the
sampler and the warm start share it.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import outcome
from tuner.bench import SGLANG_KT_MODULE, resolve_bench
from tuner.config import SearchSpace
from tuner.errors import ConfigError, KttuneError
from tuner.feasibility import LOWER_ACTIVATION_SHARE, FeasibilityGate, FeasibilityReport, launch_flags
from tuner.log import Log
from tuner.loop.launch import LaunchContext, launch
from tuner.loop.progress import Progress
from tuner.outcome import Reason
from tuner.search import DEFAULT_STRATEGY, BelowBestPruner, Strategy, make_sampler, queue_remeasurement, warm_start
from tuner.selection import best_trials, pick
from tuner.server import reap_leftovers
from tuner.storage import (
    ATTR_BASELINE,
    ATTR_CONFIRMATION_OF,
    ATTR_DUPLICATE_OF,
    ATTR_FLAGS,
    ATTR_LAUNCHED,
    ATTR_MARGINAL,
    ATTR_RUNTIME_NEED_GB,
    ATTR_SPARE_GB,
    ATTR_WORKER,
    STUDY_ATTR_CALIBRATION,
    STUDY_ATTR_EXPERT_DISTRIBUTION,
    STUDY_ATTR_RECORDING_TRIAL,
    STUDY_ATTR_SERVER,
    beat_once,
    boundary_failures,
    claim_launch,
    enqueue_baseline_once,
    find_duplicate,
    heartbeat_interval_s,
    heartbeat_on,
    is_measured,
    launched_count,
    open_study,
    proposed_trials,
    pruned_twin,
    record,
    recover_stale_trials,
    worker_id,
)
from tuner.trial import TrialRunner, probe_workload, run_trial

# Proposals that are not launched (predicted infeasible, duplicates) per launch, before we
# conclude the sampler is stuck in a region that cannot be launched.
MAX_SKIPS_PER_LAUNCH = 50


class StudyStopped(KttuneError):
    """The study cannot go on (a fault every later launch would hit too)."""


@dataclass(frozen=True)
class RunOptions:
    study_name: str
    storage: str | optuna.storages.BaseStorage
    budget: int
    seed: int | None
    studies_dir: Path
    check_feasibility: bool = True
    # Confirmation launches at the end of the budget; None = the space's `confirm` setting.
    confirm: int | None = None
    # Early stop by a probe workload (the space's `probe` setting); False = never probe.
    probe: bool = True
    # The search strategy; its variants exist for the tuning benchmark's ablations.
    strategy: Strategy = DEFAULT_STRATEGY
    # The dry run (tuner.loop.preview): its runner only prints, so a model or machine that cannot
    # be resolved here leaves the run without a gate instead of stopping it, and its "launches"
    # (all told as not started) never count as a repeating fault.
    preview: bool = False
    # Launches in a row with an environment fault (or one config fault whatever the
    # configuration) that stop the run: `tuner.outcome.stop_cause`.
    fault_streak: int = outcome.DEFAULT_STREAK
    # The server found before the first launch (tuner.preflight.ServerDialect.to_attr), stored on the study.
    server: dict[str, Any] | None = None
    # Params the local search does not move to (`kttune cpubench`'s prescreen: tuner.cpubench.Avoid).
    avoid: Callable[[Mapping[str, Any]], bool] | None = None

    def confirm_runs(self, space: SearchSpace) -> int:
        if self.confirm is not None:
            return max(0, min(self.confirm, self.budget - 1))
        return space.confirm.runs_for(self.budget)


@dataclass
class RunSummary:
    study_name: str
    storage: str
    launched: int
    budget: int
    new_trials: list[int] = field(default_factory=list)
    stopped_reason: str | None = None
    pick: list[int] = field(default_factory=list)  # `tuner.selection.pick` at the end of the run
    measured: int = 0  # trials of the study with a measurement, at the end of the run


def build_gate(space: SearchSpace, *, required: bool, log: Log | None = None) -> FeasibilityGate | None:
    """The run's one feasibility gate. Where model or hardware cannot be resolved: an error
    when the run checks feasibility, else None (the search then works without it; `log`
    hears why)."""
    try:
        return FeasibilityGate.for_space(space)
    except KttuneError as exc:
        if required:
            raise
        if log is not None:
            log(f"feasibility not checked here: {exc}")
        return None


def run_study(space: SearchSpace, opts: RunOptions, *, log: Log = print,
              runner: TrialRunner = run_trial, progress: Progress | None = None) -> RunSummary:
    """Run (or resume) the study until `opts.budget` launches are done. `runner` does one
    launch; the default starts the configured server, benchmarks tools can pass another."""
    # optuna-dashboard (for the study note after each trial) takes ~2 s to import: once, before
    # the first launch, not between trials (not in a thread: concurrent imports can deadlock).
    import optuna_dashboard  # noqa: F401
    if space.bench.module is None:
        try:
            space = resolve_bench(space)
        except ConfigError as exc:
            if not opts.preview:
                raise
            log(f"dry run: {exc}; the bench argvs below name {SGLANG_KT_MODULE}")
            space = dataclasses.replace(space, bench=dataclasses.replace(space.bench, module=SGLANG_KT_MODULE))
    gate = build_gate(space, required=opts.check_feasibility and not opts.preview, log=log)
    checks = gate if opts.check_feasibility else None
    if checks is not None:
        fitting = checks.find_fitting(space, seed=opts.seed or 0)
        if not fitting.feasible:  # refuse before anything is written to the study
            raise ConfigError(f"space: no configuration is predicted to fit (binding: {checks.summary(fitting)}); "
                              "widen the space or pass --no-feasibility")
    study = open_study(space, study_name=opts.study_name, storage=opts.storage,
                       sampler=make_sampler(space, opts.seed, opts.strategy, gate=gate, avoid=opts.avoid), log=log)
    if opts.server is not None and study.user_attrs.get(STUDY_ATTR_SERVER) != opts.server:
        study.set_user_attr(STUDY_ATTR_SERVER, opts.server)
    loop = _Loop(space, opts, study, checks, log, runner, progress)
    loop.prepare(gate)
    while loop.step():
        pass
    loop.summary.pick = [t.number for t in pick(study, space.confirm)]
    loop.summary.measured = sum(1 for t in study.get_trials(deepcopy=False) if is_measured(t))
    return loop.summary


class _Loop:
    """The state of one `kttune run` between proposals."""

    def __init__(self, space: SearchSpace, opts: RunOptions, study: optuna.Study, gate: FeasibilityGate | None,
                 log: Log, runner: TrialRunner, progress: Progress | None) -> None:
        self.space, self.opts, self.study, self.gate = space, opts, study, gate
        self.log, self.runner, self.progress = log, runner, progress
        self.probing = opts.probe and probe_workload(space) is not None and _accepts(runner, "on_probe")
        self.confirm_runs = opts.confirm_runs(space)
        self.summary = RunSummary(opts.study_name, str(opts.storage), 0, opts.budget)
        self.skips = 0
        self.recent: list[str | None] = []
        self.waiting_for: list[int] = []
        self.stored_calibration: Any = None  # the gate state last read from or written to the study

    def prepare(self, gate: FeasibilityGate | None) -> None:
        """Before the first proposal: pruner, leftovers of dead runs, baseline, warm start,
        the stored memory calibration, and the best so far of a resumed run."""
        study, space, log = self.study, self.space, self.log
        if self.probing:
            study.pruner = BelowBestPruner(space.probe.prune_below, space.probe.min_trials)
        reap_leftovers(log)  # any study's: a dead run's servers may hold this run's GPUs
        recovered = recover_stale_trials(study, log)
        if recovered:
            log(f"marked {recovered} trial(s) of a dead run as interrupted")
        if enqueue_baseline_once(study, space):
            log("baseline enqueued as the first trial")
        warm_start(study, space, gate, log)
        if self.gate is not None:
            self.stored_calibration = study.user_attrs.get(STUDY_ATTR_CALIBRATION)
            self.gate.restore(self.stored_calibration)
        if self.progress is not None:
            for t in best_trials(study):
                self.progress.observe(t.values)
        self.summary.launched = launched_count(study.get_trials(deepcopy=False))

    # -- one proposal -------------------------------------------------------------------------
    def step(self) -> bool:
        """Handle one proposal; False when the run is over."""
        study, space, opts = self.study, self.space, self.opts
        optuna.storages.fail_stale_trials(study)  # launches of dead workers: FAIL, so not counted
        trials = study.get_trials(deepcopy=False)
        self.summary.launched = launched_count(trials)
        if self.summary.launched >= opts.budget:
            return self._wait_for_other_workers(trials)
        if enqueue_baseline_once(study, space):  # again: a dead worker's launch of it was lost
            self.log("baseline enqueued again")
        if self.skips > MAX_SKIPS_PER_LAUNCH * opts.budget:
            binding = self.gate.last_binding if self.gate else "duplicates"
            self.summary.stopped_reason = (f"{self.skips} proposals in a row could not be launched ({binding}); "
                                           "widen the space or relax it")
            return False
        self._sync_calibration()
        queue_remeasurement(study, space.confirm, confirming=self.summary.launched >= opts.budget - self.confirm_runs,
                            confirm_runs=self.confirm_runs)
        trial = study.ask(space.distributions())
        trial.set_user_attr(ATTR_WORKER, worker_id())  # first: a kill from here on is recoverable on this host
        beat_once(study, trial)
        confirmation_of = trial.user_attrs.get(ATTR_CONFIRMATION_OF)
        flags = launch_flags(space, trial.params, self.gate,
                             expert_location=study.user_attrs.get(STUDY_ATTR_EXPERT_DISTRIBUTION))
        trial.set_user_attr(ATTR_FLAGS, space.redact(dict(flags)))
        report = self.gate.check(flags) if self.gate is not None else None
        forced = bool(trial.user_attrs.get(ATTR_BASELINE)) or confirmation_of is not None
        if report is not None and not forced and not self._may_launch(report):
            self._tell_infeasible(trial, report)
            return True
        if confirmation_of is None and self._tell_duplicate(trial):
            return True
        if not claim_launch(study, trial, opts.budget):  # other workers share the budget
            record(study, trial, outcome.failure(space, Reason.BUDGET_SPENT,
                                                 "other workers took the budget's last launches"), {})
            self.log(f"trial {trial.number}: not launched, other workers took the budget's last launches")
            return True
        self.skips = 0
        marginal = self._mark_prediction(trial, report)
        ctx = LaunchContext(study, space, opts.studies_dir / opts.study_name, opts.budget, self.log, self.progress)
        result, log_text, read_back = launch(ctx, trial, flags, report.constraints if report is not None else {},
                                             self.runner, launch_number=self.summary.launched + 1,
                                             probing=self.probing and confirmation_of is None,
                                             record_experts=self._records_experts())
        self.summary.new_trials.append(trial.number)
        self._observe(log_text, flags, result.reason, report, marginal, read_back)
        if not opts.preview:
            self._stop_on_repeating_faults(trial, result)
        return True

    def _records_experts(self) -> bool:
        """The study's first launch records the expert distribution when the space offers
        frequency placement (once per study, also across workers and resumed runs)."""
        return (self.space.offers_frequency_placement() and _accepts(self.runner, "record_experts")
                and STUDY_ATTR_RECORDING_TRIAL not in self.study.user_attrs)

    def _sync_calibration(self) -> None:
        """Take up what another worker of the study taught the memory model since."""
        if self.gate is None:
            return
        stored = self.study.user_attrs.get(STUDY_ATTR_CALIBRATION)
        if stored is not None and stored != self.stored_calibration:
            self.gate.restore(stored)
            self.stored_calibration = stored

    def _may_launch(self, report: FeasibilityReport) -> bool:
        assert self.gate is not None
        left = self.space.feasibility.boundary_failures - boundary_failures(self.study.get_trials(deepcopy=False))
        return self.gate.allows(report, left)

    def _tell_infeasible(self, trial: optuna.Trial, report: FeasibilityReport) -> None:
        """Predicted not to fit: tell the sampler without spending a launch."""
        assert self.gate is not None
        why = self.gate.summary(report)
        record(self.study, trial, outcome.failure(self.space, Reason.INFEASIBLE_PREDICTED, why,
                                                  constraints=report.constraints), {})
        self.skips += 1
        self.log(f"trial {trial.number}: not launched, predicted infeasible: {why}")

    def _tell_duplicate(self, trial: optuna.Trial) -> bool:
        """The same params measured, or being measured by another worker: don't launch them
        again. True when the trial was told."""
        trials = proposed_trials(self.study, trial)
        dup = find_duplicate(trials, trial.params, before=trial.number) or pruned_twin(trials, trial.params)
        if dup is None:
            return False
        told = outcome.duplicate(self.space, dup)
        if dup.state == TrialState.PRUNED and dup.intermediate_values:
            trial.report(dup.intermediate_values[max(dup.intermediate_values)], 0)
        if not dup.state.is_finished():
            self.log(f"trial {trial.number}: not launched, trial {dup.number} runs the same configuration")
        else:
            self.log(f"trial {trial.number}: not launched, the same configuration as trial {dup.number} "
                     f"({'measured' if dup.state == TrialState.COMPLETE else dup.state.name.lower()}); "
                     f"{self.skips + 1} proposal(s) skipped since the last launch")
        record(self.study, trial, told, {ATTR_DUPLICATE_OF: dup.number})
        self.skips += 1
        return True

    def _mark_prediction(self, trial: optuna.Trial, report: FeasibilityReport | None) -> bool:
        """Store the predicted memory to spare; mark and announce a launch that tests the
        memory model (it fits only inside the safety margin). True for such a launch."""
        if report is None:
            return False
        if report.slack_without_margin_gb is not None:
            trial.set_user_attr(ATTR_SPARE_GB, round(report.slack_without_margin_gb, 3))
        if report.runtime_need_gb is not None:
            trial.set_user_attr(ATTR_RUNTIME_NEED_GB, round(report.runtime_need_gb, 3))
        assert self.gate is not None
        if not self.gate.inside_margin(report):
            return False
        trial.set_user_attr(ATTR_MARGINAL, True)
        if report.fits_without_margin:
            self.log(f"trial {trial.number}: inside the safety margin (predicted slack {report.slack_without_margin_gb:.2f} GB "
                     f"without it); launching it to find the memory boundary")
        else:
            self.log(f"trial {trial.number}: fits only if activations are below their estimate (predicted slack "
                     f"{report.slack_with_lower_activations_gb:.2f} GB at {LOWER_ACTIVATION_SHARE:.0%} of it); launching it to "
                     f"measure them")
        return True

    def _observe(self, log_text: str, flags: dict[str, Any], reason: str | None, report: FeasibilityReport | None,
                 marginal: bool, read_back: dict[str, Any]) -> None:
        """Let the memory model learn from what the server reported; store what changed."""
        if self.gate is None:
            return
        before = self.gate.state()
        after = self.gate.observe(log_text, flags, reason, predicted_fit=report is not None and report.feasible,
                                  inside_margin=marginal, read_back=read_back)
        if after != before:
            self.study.set_user_attr(STUDY_ATTR_CALIBRATION, after)
            self.stored_calibration = after
            if after["margin_gb"] != before["margin_gb"]:
                self.log(f"  memory model was optimistic: margin now {after['margin_gb']:.1f} GB")

    def _stop_on_repeating_faults(self, trial: optuna.Trial, result: outcome.TrialOutcome) -> None:
        self.recent.append(result.reason)
        first_line = result.message.splitlines()[0] if result.message else ""
        if outcome.is_fatal(result.reason):
            raise StudyStopped(f"trial {trial.number} failed with {result.reason}: {first_line}; "
                               "fix the space before running again")
        cause = outcome.stop_cause(self.recent, self.opts.fault_streak)
        if cause is not None:
            raise StudyStopped(f"{cause}; the last: trial {trial.number}, {first_line}; this looks like the "
                               "environment, not the configurations: check server.python, bench.python and the "
                               "trial logs in " + str(self.opts.studies_dir / self.opts.study_name))

    def _wait_for_other_workers(self, trials: list[FrozenTrial]) -> bool:
        """Budget reached. Other workers' launches still running are waited for: one whose
        worker dies is failed by the heartbeat and owed again, and the last worker to finish
        reports the study. False when nothing is left to wait for."""
        running = [t.number for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(ATTR_LAUNCHED)]
        if not running or not heartbeat_on(self.study):
            return False
        if running != self.waiting_for:
            self.log(f"budget reached; waiting for trial(s) {', '.join(map(str, running))} of other workers")
            self.waiting_for = running
        time.sleep(heartbeat_interval_s(self.study))
        return True


def _accepts(runner: Any, name: str) -> bool:
    try:
        params = inspect.signature(runner).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
