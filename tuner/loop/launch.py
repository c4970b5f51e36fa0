"""One launch inside the loop: announce it, run it under a heartbeat, store what it left
(argv, timings, memory, quality, the prediction it was launched on) and its artifacts, tell
the verdict, and refresh the dashboard note."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from tuner import outcome
from tuner.config import FREQUENCY, PLACEMENT_FLAG, SearchSpace
from tuner.log import Log
from tuner.loop.progress import Progress
from tuner.outcome import Reason, TrialOutcome
from tuner.report import note_baseline_and_best, try_upload_trial_artifacts
from tuner.search import BelowBestPruner
from tuner.storage import (
    ATTR_ARGV,
    ATTR_CONFIRMATION_OF,
    ATTR_EXPERT_DISTRIBUTION,
    ATTR_KV_NEED,
    ATTR_LAUNCHED,
    ATTR_MEMORY,
    ATTR_PREDICTED_CONSTRAINTS,
    ATTR_PROBE_THRESHOLD,
    ATTR_QUALITY,
    ATTR_RECORDING_ERROR,
    ATTR_TIMINGS,
    ATTR_TRIAL_DIR,
    ATTR_WALL_S,
    STUDY_ATTR_EXPERT_DISTRIBUTION,
    STUDY_ATTR_QUALITY_REF,
    STUDY_ATTR_RECORDING_TRIAL,
    Heartbeat,
    record,
)
from tuner.trial import TrialRunner


@dataclass(frozen=True)
class LaunchContext:
    """What every launch of one run shares."""

    study: optuna.Study
    space: SearchSpace
    study_dir: Path  # trial folders go under it
    budget: int
    log: Log
    progress: Progress | None = None


def launch(ctx: LaunchContext, trial: optuna.Trial, flags: dict[str, Any], constraints: dict[str, float],
           runner: TrialRunner, *, launch_number: int, probing: bool = False,
           record_experts: bool = False) -> tuple[TrialOutcome, str, dict[str, Any]]:
    """Launch `trial` with `flags`; returns its outcome, the server log's text and the memory
    figures the server-info endpoint reported. A Ctrl-C records the trial as interrupted, then
    propagates. `record_experts`: this is the study's one recording of the expert distribution
    (no probe: the recording needs every workload)."""
    study, space, log, progress = ctx.study, ctx.space, ctx.log, ctx.progress
    trial_dir = (ctx.study_dir / f"trial-{trial.number}").resolve()
    trial.set_user_attr(ATTR_TRIAL_DIR, str(trial_dir))
    trial.set_user_attr(ATTR_LAUNCHED, True)
    of = trial.user_attrs.get(ATTR_CONFIRMATION_OF)
    note = "" if of is None else f" confirmation of trial {of}:"
    if progress is not None:
        progress.trial_started(trial.number, launch_number, ctx.budget, trial.params)
        on_phase: Callable[[str], None] = progress.phase
    else:
        log(f"trial {trial.number} (launch {launch_number}/{ctx.budget}):{note} {_fmt_params(trial.params)}")
        on_phase = lambda p: log(f"  {p}")  # noqa: E731
    started = time.monotonic()
    try:
        with Heartbeat(study, trial):
            reference = study.user_attrs.get(STUDY_ATTR_QUALITY_REF)
            extra: dict[str, Any] = {"quality_reference": reference} if reference else {}
            if record_experts:
                study.set_user_attr(STUDY_ATTR_RECORDING_TRIAL, trial.number)
                extra["record_experts"] = True
                on_phase("recording the expert distribution over the workloads")
            elif probing:
                extra["on_probe"] = lambda metrics: _probe_verdict(space, trial, metrics)
            run = runner(space, flags, trial_dir, on_phase=on_phase, **extra)
    except KeyboardInterrupt:
        try_upload_trial_artifacts(study, trial, trial_dir, log)
        record(study, trial, outcome.failure(space, Reason.INTERRUPTED, "the tuner was stopped"), {})
        raise
    result = run.outcome
    if not getattr(run, "started", True):  # no server ever ran: the budget is not spent
        trial.set_user_attr(ATTR_LAUNCHED, False)
        log(f"  trial {trial.number}: no server was started ({result.reason}); the launch is not counted")
    # What was measured overrides what was predicted: a launched trial carries the
    # prediction only as information, never as a constraint.
    attrs: dict[str, Any] = {ATTR_ARGV: space.redact(run.argv), ATTR_TIMINGS: run.timings, ATTR_MEMORY: run.memory,
                             ATTR_WALL_S: round(time.monotonic() - started, 2),
                             ATTR_PREDICTED_CONSTRAINTS: dict(constraints), ATTR_KV_NEED: space.kv_need_tokens(flags)}
    if record_experts:
        _store_recording(ctx, trial, run, attrs)
    quality = getattr(run, "quality", None)
    if quality:
        attrs[ATTR_QUALITY] = quality
        if quality.get("reference") and STUDY_ATTR_QUALITY_REF not in study.user_attrs:
            study.set_user_attr(STUDY_ATTR_QUALITY_REF, quality["reference"])
            log(f"  trial {trial.number} is the output-quality reference")
    try_upload_trial_artifacts(study, trial, trial_dir, log)  # before tell: finished trials are read-only
    record(study, trial, result, attrs)
    verdict = "ok" if result.ok else f"{result.reason}"
    if progress is not None:
        progress.trial_finished(trial.number, verdict, result.values, why=result.why,
                                feasible=all(v <= 0 for v in result.constraints.values()))
    else:
        log(f"trial {trial.number}: {verdict}  objective = {_fmt_values(result.values)}  ({attrs[ATTR_WALL_S]:.1f}s)")
        if result.why:
            log(f"  why: {result.why}")
    try:
        note_baseline_and_best(study, space.confirm)
    except Exception as exc:  # a dashboard note is a convenience; never lose the trial over it
        log(f"  (dashboard note not written: {type(exc).__name__}: {exc})")
    return result, run.log_text(), dict(getattr(run, "read_back", None) or {})


def _store_recording(ctx: LaunchContext, trial: optuna.Trial, run: Any, attrs: dict[str, Any]) -> None:
    """Offer the dump to every later trial of the study (`frequency` placement reads it)."""
    dump = getattr(run, "expert_distribution", None)
    if dump:
        attrs[ATTR_EXPERT_DISTRIBUTION] = dump
        ctx.study.set_user_attr(STUDY_ATTR_EXPERT_DISTRIBUTION, dump)
        ctx.log(f"  trial {trial.number} recorded the expert distribution: {dump}")
        if trial.params.get(PLACEMENT_FLAG) != FREQUENCY:  # the choice the recording paid for, tried next
            ctx.study.enqueue_trial({**trial.params, PLACEMENT_FLAG: FREQUENCY}, skip_if_exists=True)
    else:
        why = getattr(run, "recording_error", None) or f"the launch failed ({run.outcome.reason})"
        attrs[ATTR_RECORDING_ERROR] = why
        ctx.log(f"  trial {trial.number}: no expert distribution recorded ({why}); frequency placement "
                "falls back to uniform")


def _probe_verdict(space: SearchSpace, trial: optuna.Trial, metrics: dict[str, float]) -> bool:
    """Report the probe as the intermediate value (step 0) and ask the study's pruner."""
    values = outcome.objective_values(space, metrics)
    if values is None:
        return False
    trial.report(values[0], 0)
    pruner = trial.study.pruner
    if isinstance(pruner, BelowBestPruner):  # kept, so that `kttune show` can say what the probe missed
        bound = pruner.threshold(trial.study, trial.number)
        if bound is not None:
            trial.set_user_attr(ATTR_PROBE_THRESHOLD, bound)
    return trial.should_prune()


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _fmt_values(values: list[float] | None) -> str:
    return "-" if values is None else ", ".join(f"{v:.4g}" for v in values)
