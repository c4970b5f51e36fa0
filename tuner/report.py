"""Read a finished (or running) study back: best-trial tables and profile export."""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError, KttuneError
from tuner.profile import render_profile, write_atomic
from tuner.space import SearchSpace
from tuner.study import ATTR_BASELINE, ATTR_LAUNCHED, ATTR_REASON, best_trials, make_storage, metrics_of

SHOWN_METRICS = ("output_throughput", "input_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


def load_study(study_name: str, storage: str) -> optuna.Study:
    store = make_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        hint = f" (it has: {', '.join(names)})" if names else ""
        raise ConfigError(f"--study: no study {study_name!r} in {storage}{hint}; run `kttune run` first or pass --study") from None


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def best_table(space: SearchSpace, study: optuna.Study) -> list[list[str]]:
    """Rows (header first) for the feasible best trial(s), computed, not printed."""
    best = best_trials(study)
    keys = [o.key for o in space.objectives]
    extra = sorted({k for t in best for k in metrics_of(t) if k.rsplit(".", 1)[-1] in SHOWN_METRICS} - set(keys))
    params = [p.flag for p in space.params]
    rows = [["trial", *params, *keys, *extra]]
    for t in best:
        m = metrics_of(t)
        rows.append([str(t.number) + (" (baseline)" if t.user_attrs.get(ATTR_BASELINE) else ""),
                     *(_fmt(t.params.get(p, "")) for p in params),
                     *(_fmt(m.get(k, "")) for k in keys), *(_fmt(m.get(k, "")) for k in extra)])
    return rows


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def failure_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        reason = t.user_attrs.get(ATTR_REASON)
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def print_best(space: SearchSpace, study_name: str, storage: str) -> bool:
    study = load_study(study_name, storage)
    trials = study.get_trials(deepcopy=False)
    launched = sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED))
    rows = best_table(space, study)
    title = "Pareto front" if len(space.objectives) > 1 else "best trial"
    print(f"study {study_name}: {len(trials)} trials, {launched} launched")
    fails = failure_counts(study)
    if fails:
        print("not measured: " + ", ".join(f"{k} ×{v}" for k, v in sorted(fails.items())))
    if len(rows) == 1:
        print("no feasible trial yet")
        return False
    print(f"{title}:")
    print(_render(rows))
    return True


def pick_trial(study: optuna.Study, trial_number: int | None) -> FrozenTrial:
    if trial_number is not None:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= trial_number < len(trials):
            raise ConfigError(f"--trial: no trial {trial_number}; the study has trials 0..{len(trials) - 1}")
        t = trials[trial_number]
        if t.state != TrialState.COMPLETE:
            raise ConfigError(f"--trial: trial {trial_number} is {t.state.name}; pick a completed one")
        return t
    best = best_trials(study)
    if not best:
        raise KttuneError("no feasible trial to export yet; run more trials or pass --trial N")
    if len(best) > 1:
        raise ConfigError(f"--trial: the study has {len(best)} Pareto-optimal trials ({', '.join(str(t.number) for t in best)}); pick one with --trial N")
    return best[0]


def export_profile(space: SearchSpace, study_name: str, storage: str, out: Path,
                   trial_number: int | None = None) -> Path:
    study = load_study(study_name, storage)
    trial = pick_trial(study, trial_number)
    text = render_profile(trial, study_name=study_name, objectives=[o.key for o in space.objectives])
    write_atomic(out, text)
    return out
