"""`kttune export`: choose the trial to deploy (`--trial`, `--weights`, or the selection
rule) and write its flags as a `sglang.launch_server --config` profile."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.config import SearchSpace
from tuner.errors import ConfigError, KttuneError
from tuner.preflight import ProfileVerdict, check_profile
from tuner.report.outpath import check_out_file
from tuner.report.profile import SIMULATOR_MODULE, render_profile, servable_profile, write_atomic
from tuner.report.status import no_feasible_message
from tuner.selection import (
    pick,
    pick_by_weights,
    repeat_groups,
)
from tuner.storage import is_measured, load_study


def parse_weights(text: str, objective_keys: Sequence[str]) -> dict[str, float]:
    """`decode.output_throughput=2,prefill=1` → weight per objective key. A key may be the
    full `workload.metric`, or a workload or metric name that names one objective only."""
    out: dict[str, float] = {}
    for item in (s for s in text.split(",") if s.strip()):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"--weights: {item!r} is not key=weight; e.g. --weights decode.output_throughput=2,prefill.input_throughput=1")
        matches = [k for k in objective_keys if name in (k, *k.split(".", 1))]
        if len(matches) != 1:
            what = "matches no objective" if not matches else f"is ambiguous ({', '.join(matches)})"
            raise ConfigError(f"--weights: {name!r} {what}; use one of: {', '.join(objective_keys)}")
        try:
            w = float(raw)
        except ValueError:
            raise ConfigError(f"--weights: weight {raw.strip()!r} for {name} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"--weights: weight for {name} must be a finite number ≥ 0, got {raw.strip()}")
        out[matches[0]] = out.get(matches[0], 0.0) + w
    if not out or sum(out.values()) <= 0:
        raise ConfigError("--weights: give at least one positive weight, e.g. decode.output_throughput=1")
    return out


def pick_trial(study: optuna.Study, trial_number: int | None, *, space: SearchSpace,
               weights: Mapping[str, float] | None = None) -> FrozenTrial:
    if trial_number is not None and weights:
        raise ConfigError("--trial and --weights exclude each other; pass one")
    if trial_number is not None:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= trial_number < len(trials):
            raise ConfigError(f"--trial: no trial {trial_number}; the study has trials 0..{len(trials) - 1}")
        t = trials[trial_number]
        if t.state != TrialState.COMPLETE:
            raise ConfigError(f"--trial: trial {trial_number} is {t.state.name}; pick a completed one")
        return t
    best = pick(study, space.confirm)
    if not best and not any(is_measured(t) for t in study.get_trials(deepcopy=False)):
        raise ConfigError(f"--study: study {study.study_name!r} has no measured trial to export; run `kttune run` "
                          "(more launches) first; `kttune show N` says why a trial has no result")
    if not best:
        raise KttuneError(no_feasible_message(study))
    if weights:
        return pick_by_weights(best, [(o.key, o.direction) for o in space.objectives], weights)
    if len(best) > 1:
        raise ConfigError(f"--trial: the study has {len(best)} Pareto-optimal trials ({', '.join(str(t.number) for t in best)}); "
                          "pick one with --trial N or state a preference with --weights KEY=W,...")
    return best[0]


def export_profile(space: SearchSpace, study_name: str, storage: str, out: Path,
                   trial_number: int | None = None, weights: Mapping[str, float] | None = None, *,
                   keep_benchmark_flags: bool = False) -> tuple[Path, ProfileVerdict]:
    """Write the chosen trial's profile to `out` once the space's server has parsed it with its
    own ``--config`` merger (:func:`tuner.preflight.check_profile`); returns the path and who
    checked it. A refusal is a ConfigError naming the key, and nothing is left at `out`."""
    check_out_file(out)  # before the study is read: a bad --out is known now
    study = load_study(study_name, storage)
    trial = pick_trial(study, trial_number, space=space, weights=weights)
    simulated = space.server.module == SIMULATOR_MODULE
    profile = servable_profile(trial, simulated=simulated, keep_benchmark_flags=keep_benchmark_flags,
                               secrets=space.secrets)
    group = next((g for g in repeat_groups(study) if g.first.number == trial.number), None)
    measured = "" if group is None or len(group.values) < 2 else \
        f"{len(group.values)} launches, objective mean {group.mean:.4g} ± {group.spread:.2g}"
    text = render_profile(trial, profile, study_name=study_name, objectives=[o.key for o in space.objectives],
                          measured=measured)
    staged = out.with_name(f".{out.stem}.{os.getpid()}.check{out.suffix or '.yaml'}")
    write_atomic(staged, text)
    try:
        verdict = check_profile(space, staged)
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return out, verdict
