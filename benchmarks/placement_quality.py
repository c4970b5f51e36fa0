"""Placement quality: what searching expert placement (uniform, or frequency from the study's own
recording), dynamic expert update and the CPU kernel adds to a study, on a simulated space with
skewed expert routing. Run by `benchmarks/tuning_quality.py --placement`; prints one table.

For each seed, a `kttune run` study (`run_study`, in-process simulator, noise sigma 0.025 plus
slow runs, in-memory storage) of `budget` launches, the expert-distribution recording included
(the study's first launch). Score = the true (noise-free) objective of the study's pick, with
the study's own dump for `frequency`, / the best configuration with uniform placement and no
dynamic update in the whole space (the grid optimum of the same space with those two fixed):
median over seeds, (10th percentile, worst). The second row runs the same studies on that
uniform-only space: what a study without the placement levers picks.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from tuner.config import FREQUENCY, PLACEMENT_FLAG, SearchSpace, load_space
from tuner.feasibility import FeasibilityGate, launch_flags
from tuner.loop import RunOptions, run_study
from tuner.selection import pick
from tuner.sim.inprocess import InProcessRunner
from tuner.sim.optimum.grid import SpaceGrid
from tuner.storage import ATTR_LAUNCHED, STUDY_ATTR_EXPERT_DISTRIBUTION

PLACEMENT_SPACE = "search_spaces/sim-kimi-k2-thinking-8xl20-placement.yaml"
DYNAMIC_FLAG = "kt-enable-dynamic-expert-update"
TARGET = 1.05
UNIFORM = {PLACEMENT_FLAG: "uniform", DYNAMIC_FLAG: False}


def uniform_only(space: SearchSpace) -> SearchSpace:
    """The space with uniform placement and no dynamic update (the levers fixed off)."""
    params = tuple(replace(p, choices=(UNIFORM[p.flag],)) if p.flag in UNIFORM else p for p in space.params)
    baseline = {**space.baseline, **{k: v for k, v in UNIFORM.items() if k in space.baseline}} if space.baseline else None
    return replace(space, name=space.name + "-uniform", params=params, baseline=baseline)


@dataclass
class StudyResult:
    score: float            # true value of the pick / best uniform
    found: float            # best true value among its launches / best uniform
    placement: bool         # the pick uses frequency placement or dynamic update
    launches: int
    recorded: bool


def true_value(space: SearchSpace, params: dict[str, Any], dump: str | None, gate: FeasibilityGate | None,
               tmp: Path, cache: dict[str, Any]) -> float:
    """Noise-free objective of `params` (0 when it does not run)."""
    runner = InProcessRunner(noise_sigma=0.0, cache=cache)
    run = runner(space, launch_flags(space, params, gate, expert_location=dump), tmp / f"truth-{len(list(tmp.iterdir()))}")
    return run.outcome.values[0] if run.outcome.ok and run.outcome.values else 0.0


def run_one(space: SearchSpace, seed: int, budget: int, noise: float, best_uniform: float, tmp: Path,
            cache: dict[str, Any]) -> StudyResult:
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name=f"placement-{seed}", storage=storage, budget=budget, seed=seed,
                      studies_dir=tmp / f"study-{space.name}-{seed}")
    run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(noise_sigma=noise, seed=seed, cache=cache))
    study = optuna.load_study(study_name=opts.study_name, storage=storage)
    dump = study.user_attrs.get(STUDY_ATTR_EXPERT_DISTRIBUTION)
    gate = FeasibilityGate.for_space(space)
    picked = dict(pick(study, space.confirm)[0].params)
    launched = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    truths = tmp / f"truth-{space.name}-{seed}"
    truths.mkdir()
    found = max(true_value(space, dict(t.params), dump, gate, truths, cache) for t in launched)
    return StudyResult(true_value(space, picked, dump, gate, truths, cache) / best_uniform, found / best_uniform,
                       picked.get(PLACEMENT_FLAG) == FREQUENCY or bool(picked.get(DYNAMIC_FLAG)), len(launched),
                       dump is not None)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def placement_table(space_path: str = PLACEMENT_SPACE, *, seeds: Sequence[int] = tuple(range(10)), budget: int = 20,
                    noise: float = 0.025) -> str:
    started = time.monotonic()
    space = load_space(space_path, check_paths=False)
    uniform = uniform_only(space)
    best = SpaceGrid(uniform).optimum().entries[0]
    cache: dict[str, Any] = {}
    lines = [f"## placement: {space.name}, budget {budget} launches (the recording included), seeds "
             f"{seeds[0]}..{seeds[-1]}, noise sigma {noise}",
             f"best uniform configuration (grid, placement uniform, no dynamic update): {best.value:.4g} "
             f"({' '.join(f'{k}={v}' for k, v in best.params.items())})", "",
             "| study | pick / best uniform: median (p10, worst) | seeds ≥ +5 % | found (median) | picks using "
             "placement | recorded |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="kttune-placement-") as d:
        for label, sp in (("kttune, placement searched", space), ("kttune, uniform only", uniform)):
            results = [run_one(sp, s, budget, noise, best.value, Path(d), cache) for s in seeds]
            scores = [r.score for r in results]
            lines.append(f"| {label} | {statistics.median(scores):.3f} ({_pct(scores, 0.1):.3f}, {min(scores):.3f}) | "
                         f"{sum(s >= TARGET for s in scores)}/{len(scores)} | "
                         f"{statistics.median(r.found for r in results):.3f} | "
                         f"{sum(r.placement for r in results)}/{len(results)} | "
                         f"{sum(r.recorded for r in results)}/{len(results)} |")
    lines.append(f"\n(placement table: {time.monotonic() - started:.0f} s)")
    return "\n".join(lines)
