"""Tuning quality: how close each search method gets to the true optimum within a
launch budget, on every simulator search space. Prints tables; not a test.

    python benchmarks/tuning_quality.py                 # 10 seeds, budgets 5/10/20 (~2 min on 2 cores)
    python benchmarks/tuning_quality.py --quick         # 3 seeds
    python benchmarks/tuning_quality.py --variants      # + the strategy's levers one by one
    python benchmarks/tuning_quality.py --margin-gb 0.5 # what-if: the gate's startup margin
    python benchmarks/tuning_quality.py --full-path     # + real `kttune run` vs the in-process model
    python benchmarks/tuning_quality.py --placement     # only the placement table (benchmarks/placement_quality.py)

Methods, each on the same simulated server (`tuner.sim.inprocess.InProcessRunner`, noise
sigma 0.025 plus slow runs, a fresh draw per launch):
  kttune    `tuner.loop.run.run_study` as `kttune run` runs it (feasibility gate, duplicates,
            default strategy), in-memory storage
  random    uniform draws from the space's grid, every one launched
  grid      a coarse grid like vLLM auto_tune's: levels added to the knobs in turn until the
            grid holds the budget, visited in a seeded order, truncated to the budget
  kt        kt's own tuner: binary search on launches for the largest kt-num-gpu-experts that
            starts, the rest at kt defaults (cpuinfer int(0.8 x logical threads), threadpool =
            NUMA nodes, chunk 4096, max-running-requests 32; snapped into the space)
  baseline  the space's hand-tuned baseline (the seed's config on the seed space)

Score = true (noise-free) objective of the configuration the method would pick (its best
measured launch) / the true optimum of the grid (`tuner.sim.optimum`): median over seeds,
(10th percentile, worst); "deployable" = the same against the deployable optimum, the best
configuration that fails at most 2 % of fresh starts (the optimum itself may sit at the memory
cliff and fail more; `deployable_optimum`), median (worst); "found" = the best noise-free value among its launches (what a
perfect pick would get); "rec" = the same score for the configuration
`tuner.search.gp.denoised_best` would name (a GP posterior mean over the launches instead of the
single best measurement, applied to every method's launches); "meas" = the pick's measured value / optimum (noise can put it above
1); "wasted" = launches that failed for the configuration's sake (OOM, ...), mean per run; "pick fails" =
the share of 40 fresh noisy launches of the picked configuration that fail (OOM fuzz near the memory
cliff), mean over runs: how often the exported profile would not come up; "redeploy" = the mean
measured objective of those fresh launches that started / the optimum, median over runs (worst run
in brackets): what the profile runs at when redeployed, start-up draw included; "lucky pools" = runs
whose pick's own launches all had a KV pool holding the objective workload's need while fewer than
half of its fresh starts do. Budgets 5 and 10 are the first launches
of the budget-20 run for every method that does not plan by budget (all but grid).
"""
from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuner.config import FeasibilitySpec, SearchSpace, load_space  # noqa: E402
from tuner.feasibility import FeasibilityGate  # noqa: E402
from tuner.loop import RunOptions, run_study  # noqa: E402
from tuner.outcome import PRUNED, is_config_reason  # noqa: E402
from tuner.search import (  # noqa: E402
    DEFAULT_STRATEGY,
    Strategy,
    denoised_best,  # noqa: E402
    param_grid,  # noqa: E402
)
from tuner.selection import pick  # noqa: E402
from tuner.sim.inprocess import InProcessRunner  # noqa: E402
from tuner.sim.optimum.grid import SpaceGrid  # noqa: E402
from tuner.storage import ATTR_LAUNCHED, ATTR_MEMORY, ATTR_REASON, STUDY_ATTR_CALIBRATION, timings_of  # noqa: E402
from tuner.testing.probe import ProbeEmulator  # noqa: E402

# The placement space has its own table (--placement): its frequency choice needs the study's recording.
SPACES = sorted(str(p.relative_to(REPO)) for p in (REPO / "search_spaces").glob("sim-*.yaml")
                if not p.stem.endswith("-placement"))
VARIANTS: dict[str, Strategy] = {
    "tpe (old default)": Strategy(inner="tpe", warm=False, snap=False, startup_trials=5),
    "tpe + warm + snap": Strategy(inner="tpe", warm=True, snap=True),
    "local, no warm": Strategy(warm=False),
    "local, no snap": Strategy(snap=False),
    "local, explore 0": Strategy(explore=0.0),
    "local, explore 0.3": Strategy(explore=0.3),
    "local + GP incumbent": Strategy(denoise=True),
    "local, room-making moves not first": Strategy(room_first=False),
    "local, small grids on the step ladder": Strategy(small_grid=0),
}


@dataclass
class Launch:
    params: dict[str, Any]
    value: float | None           # measured objective; None when the launch failed
    reason: str | None
    pool: int | None = None       # the KV pool the server logged


@dataclass
class Run:
    launches: list[Launch] = field(default_factory=list)
    tuner_s: float = 0.0          # wall time outside the runner (kttune only)
    asks: int = 0
    pick: dict[str, Any] | None = None   # the method's own pick (kttune: by confirmed mean)
    bench_s: float = 0.0          # simulated benchmark seconds run (kttune only)
    saved_s: float = 0.0          # benchmark seconds the probe saved, net of probe time
    pruned_best: float = 0.0      # best noise-free value / optimum among pruned launches
    pruned: int = 0
    pick_pools: list[int] = field(default_factory=list)  # KV pools of the pick's own launches (kttune)


FAIL_RATE_LAUNCHES = 40


@dataclass(frozen=True)
class Fresh:
    """FAIL_RATE_LAUNCHES fresh launches of one configuration."""

    fails: float       # share that failed
    redeploy: float    # mean measured objective of those that started / the optimum
    held: float        # share of those that started whose KV pool held the workload's need


def kv_pool_of(memory: dict[str, Any]) -> int | None:
    v = memory.get("kv_tokens", memory.get("max_total_num_tokens"))
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


@dataclass
class Scene:
    """One space: its grid truth, the shared model cache and the feasibility model."""

    space: SearchSpace
    grid: SpaceGrid
    optimum: float
    sign: float
    deployable: float = math.nan  # the best value among configurations that start at least 98 % of the time
    cache: dict[str, Any] = field(default_factory=dict)
    gate: FeasibilityGate | None = None

    @property
    def grids(self) -> dict[str, list[Any]]:
        return {p.flag: param_grid(p) for p in self.space.params}

    def true(self, params: dict[str, Any]) -> float:
        v = self.grid.values_of(params)
        return 0.0 if v is None else v[0]

    def runner(self, seed: int, noise: float) -> InProcessRunner:
        return InProcessRunner(noise_sigma=noise, seed=seed, cache=self.cache)

    def fresh(self, params: dict[str, Any], launches: int = FAIL_RATE_LAUNCHES) -> Fresh:
        """Fresh launches of `params` (each with its own noise and start-up memory draw): how
        often the picked profile would not come up in production, and what it runs at when it does."""
        key = (tuple(sorted(params.items())), launches)
        memo = self.cache.setdefault("fresh", {})
        if key not in memo:
            with tempfile.TemporaryDirectory() as tmp:
                runs = [self.launch(self.runner(10_000 + i, 0.025), params, Path(tmp)) for i in range(launches)]
            ok = [x for x in runs if x.value is not None]
            need = self.need(params)
            memo[key] = Fresh(1 - len(ok) / launches, statistics.mean(x.value for x in ok) / self.optimum if ok else 0.0,  # type: ignore[misc]
                              sum(1 for x in ok if need and x.pool is not None and x.pool >= need) / max(len(ok), 1))
        return memo[key]

    def need(self, params: dict[str, Any]) -> int | None:
        """KV tokens the objective's workload runs at once with these params (kttune's own measure)."""
        flags = self.space.launch_flags(params)
        return self.space.kv_need_tokens(flags).get(self.space.objectives[0].workload)

    def launch(self, runner: InProcessRunner, params: dict[str, Any], tmp: Path) -> Launch:
        flags = self.space.launch_flags(params)
        if self.gate is not None:
            flags = self.gate.resolve_auto(flags)
        run = runner(self.space, flags, tmp / f"launch-{runner.launches}")
        o = run.outcome
        return Launch(dict(params), o.values[0] if o.ok and o.values else None, o.reason, kv_pool_of(run.memory))


def load_scene(path: str) -> Scene:
    space = load_space(REPO / path, check_paths=False)
    grid = SpaceGrid(space)
    res = grid.optimum()
    if not res.entries:
        raise SystemExit(f"{path}: nothing in the grid is feasible")
    obj = space.objectives[0]
    try:
        gate = FeasibilityGate.for_space(space)
    except Exception:  # noqa: BLE001 - spaces without a resolvable model still run
        gate = None
    sign = 1.0 if obj.direction == "maximize" else -1.0
    scene = Scene(space, grid, res.entries[0].value, sign, gate=gate)
    scene.deployable = deployable_optimum(scene)
    return scene


# Fresh starts a deployable configuration may fail at most, and the fresh launches that judge it.
DEPLOY_FAILS = 0.02
DEPLOY_LAUNCHES = 200


def deployable_optimum(sc: Scene) -> float:
    """The best noise-free value among grid configurations that fail at most DEPLOY_FAILS of
    DEPLOY_LAUNCHES fresh noisy launches (each its own start-up draw), trying only those that
    still run when the simulator's start-up draw (uniform in ±oom_band_gib on free memory,
    tuner/sim/perfmodel/startup.py) lands at that quantile. The optimum itself may sit at the
    memory cliff and fail a share of starts: no pick should be it."""
    scn = sc.grid.scn
    shift = (1 - 2 * DEPLOY_FAILS) * scn.c("oom_band_gib")
    unlucky = SpaceGrid(sc.space, replace(scn, gpu=replace(scn.gpu, reserved_by_others_gib=scn.gpu.reserved_by_others_gib + shift)))
    for value, params in sc.grid.ranked(within=1.0):
        if unlucky.values_of(params) is not None and sc.fresh(params, DEPLOY_LAUNCHES).fails <= DEPLOY_FAILS:
            return value
    return math.nan


# ----------------------------------------------------------------------------- methods


def run_kttune(sc: Scene, seed: int, budget: int, noise: float, tmp: Path, *,
               strategy: Strategy | None = None, margin_gb: float | None = None,
               confirm: int | None = None, probe: bool = True, avoid: Callable[..., bool] | None = None) -> Run:
    inner = sc.runner(seed, noise)
    runner = ProbeEmulator(inner, seed=seed)
    storage = optuna.storages.InMemoryStorage()
    name = f"bench-{seed}"
    if margin_gb is not None:   # what-if: start the study with another gate margin
        st = optuna.create_study(study_name=name, storage=storage, directions=sc.space.directions)
        st.set_user_attr(STUDY_ATTR_CALIBRATION, {"margin_gb": margin_gb})
    opts = RunOptions(study_name=name, storage=storage, budget=budget, seed=seed,
                      studies_dir=tmp / f"kttune-{seed}", confirm=confirm, probe=probe,
                      strategy=strategy or DEFAULT_STRATEGY, avoid=avoid)
    started = time.perf_counter()
    run_study(sc.space, opts, log=lambda _m: None, runner=runner)
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=storage)
    out = Run(tuner_s=wall - inner.busy_s, asks=len(study.trials), bench_s=runner.bench_s, saved_s=runner.saved_s,
              pruned=runner.pruned)
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.user_attrs.get(ATTR_LAUNCHED):
            reason = t.user_attrs.get(ATTR_REASON)
            out.launches.append(Launch(dict(t.params), t.values[0] if reason is None and t.values else None, reason))
            if reason == PRUNED:
                out.pruned_best = max(out.pruned_best, sc.true(t.params) / sc.optimum)
    picked = pick(study, sc.space.confirm)
    out.pick = dict(picked[0].params) if picked else None
    out.pick_pools = [p for t in study.trials if picked and t.params == picked[0].params and t.user_attrs.get(ATTR_LAUNCHED)
                      and not t.user_attrs.get(ATTR_REASON) and (p := kv_pool_of(t.user_attrs.get(ATTR_MEMORY) or {})) is not None]
    return out


def run_random(sc: Scene, seed: int, budget: int, noise: float, tmp: Path) -> Run:
    rng = random.Random(f"random/{seed}")
    runner = sc.runner(seed, noise)
    grids = {p.flag: param_grid(p) for p in sc.space.params}
    out = Run()
    for _ in range(budget):
        params = {f: rng.choice(g) for f, g in grids.items()}
        out.launches.append(sc.launch(runner, params, tmp))
    return out


def grid_plan(space: SearchSpace, budget: int, seed: int) -> list[dict[str, Any]]:
    grids = {p.flag: param_grid(p) for p in space.params}
    levels = dict.fromkeys(grids, 1)
    while math.prod(levels.values()) < budget:
        open_ = [f for f in grids if levels[f] < len(grids[f])]
        if not open_:
            break
        levels[min(open_, key=lambda f: levels[f])] += 1

    def pick(values: list[Any], k: int) -> list[Any]:
        if k == 1:
            return [values[len(values) // 2]]
        return [values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)]

    combos = list(itertools.product(*(pick(grids[f], levels[f]) for f in grids)))
    random.Random(f"grid/{seed}").shuffle(combos)
    return [dict(zip(grids, c)) for c in combos[:budget]]


def run_grid(sc: Scene, seed: int, budget: int, noise: float, tmp: Path) -> Run:
    runner = sc.runner(seed, noise)
    out = Run()
    for params in grid_plan(sc.space, budget, seed):
        out.launches.append(sc.launch(runner, params, tmp))
    return out


def kt_defaults(sc: Scene) -> dict[str, Any]:
    hw = sc.gate.hardware if sc.gate is not None else None
    targets = {"kt-cpuinfer": int(0.8 * hw.cpu.logical_cores) if hw else None,
               "kt-threadpool-count": hw.cpu.numa_nodes if hw else None,
               "chunked-prefill-size": 4096, "max-running-requests": 32}
    base = dict(sc.space.baseline or {})
    out = {}
    for p in sc.space.params:
        grid = param_grid(p)
        t = targets.get(p.flag)
        if t is not None and all(isinstance(v, (int, float)) for v in grid):
            out[p.flag] = min(grid, key=lambda v: (abs(v - t), v))
        else:
            out[p.flag] = base.get(p.flag, grid[len(grid) // 2])
    return out


def run_kt(sc: Scene, seed: int, budget: int, noise: float, tmp: Path) -> Run:
    runner = sc.runner(seed, noise)
    out = Run()
    flag = "kt-num-gpu-experts"
    spec = next((p for p in sc.space.params if p.flag == flag), None)
    if spec is None:
        return out
    grid = param_grid(spec)
    base = kt_defaults(sc)
    lo, hi = 0, len(grid) - 1
    while lo < hi and len(out.launches) < budget:
        mid = (lo + hi + 1) // 2
        launch = sc.launch(runner, {**base, flag: grid[mid]}, tmp)
        out.launches.append(launch)
        lo, hi = (mid, hi) if launch.value is not None else (lo, mid - 1)
    if lo == hi and len(out.launches) < budget and not any(x.params[flag] == grid[lo] for x in out.launches):
        out.launches.append(sc.launch(runner, {**base, flag: grid[lo]}, tmp))
    return out


def run_baseline(sc: Scene, seed: int, budget: int, noise: float, tmp: Path) -> Run:
    out = Run()
    if sc.space.baseline is not None:
        out.launches.append(sc.launch(sc.runner(seed, noise), dict(sc.space.baseline), tmp))
    return out


METHODS: dict[str, Callable[..., Run]] = {"kttune": run_kttune, "random": run_random, "grid": run_grid,
                                          "kt": run_kt, "baseline": run_baseline}
PLANNED = {"grid", "kttune"}   # depend on the budget (kttune: confirmations at its end): one run per budget


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Score:
    true: float        # the pick (best measured launch), noise-free / optimum
    deployed: float    # the same / the deployable optimum (Scene.deployable)
    rec: float         # the GP-denoised pick (tuner.search.gp.denoised_best), same
    measured: float    # the pick's measured value / optimum
    found: float       # best noise-free value among the launches / optimum (a perfect pick)
    wasted: int
    launches: int
    pick_fails: float = 0.0  # share of fresh (noisy) launches of the pick that fail
    redeploy: float = 0.0    # its fresh launches' mean measured objective / the optimum
    lucky: bool = False      # every own launch's KV pool held the need; most fresh starts' do not


def score(sc: Scene, run: Run, k: int) -> Score:
    first = run.launches[:k]
    ok = [x for x in first if x.value is not None]
    wasted = sum(1 for x in first if x.reason is not None and is_config_reason(x.reason))
    if not ok:
        return Score(0.0, 0.0, 0.0, 0.0, 0.0, wasted, len(first))
    best = max(ok, key=lambda x: sc.sign * x.value)  # type: ignore[operator]
    if run.pick is not None and k >= len(run.launches):   # the method's own pick (confirmed mean)
        best = next((x for x in ok if x.params == run.pick), best)
    found = max((sc.true(x.params) for x in ok), key=lambda v: sc.sign * v)
    rec = denoised_best(sc.grids, [SimpleNamespace(params=x.params, values=[x.value]) for x in ok], sc.sign)
    fresh = sc.fresh(best.params)
    own = run.pick_pools if run.pick is not None and best.params == run.pick else []
    need = sc.need(best.params)
    lucky = bool(own) and need is not None and min(own) >= need and fresh.held < 0.5
    return Score(sc.true(best.params) / sc.optimum, sc.true(best.params) / sc.deployable,  # type: ignore[arg-type]
                 sc.true(rec.params) / sc.optimum,  # type: ignore[arg-type]
                 best.value / sc.optimum, found / sc.optimum, wasted, len(first),  # type: ignore[operator]
                 fresh.fails, fresh.redeploy, lucky)


def summarize(scores: list[Score]) -> dict[str, float]:
    t = sorted(s.true for s in scores)
    d = sorted(s.deployed for s in scores)
    return {"median": statistics.median(t), "p10": t[max(0, math.ceil(0.1 * len(t)) - 1)], "min": t[0],
            "dep_median": statistics.median(d), "dep_min": d[0],
            "meas": statistics.median(s.measured for s in scores),
            "found": statistics.median(s.found for s in scores),
            "rec": statistics.median(s.rec for s in scores),
            "wasted": statistics.mean(s.wasted for s in scores),
            "pick_fails": statistics.mean(s.pick_fails for s in scores),
            "redeploy": statistics.median(s.redeploy for s in scores),
            "redeploy_min": min(s.redeploy for s in scores),
            "lucky": sum(s.lucky for s in scores),
            "launches": statistics.mean(s.launches for s in scores)}


PROBE_STATS: list[tuple[str, int, Run]] = []   # (space, budget, run) of kttune runs, for the probe table


def evaluate(sc: Scene, name: str, fn: Callable[..., Run], seeds: Sequence[int], budgets: Sequence[int],
             noise: float, tmp: Path, **kw: Any) -> tuple[dict[int, dict[str, float]], float, float]:
    per_budget: dict[int, list[Score]] = {b: [] for b in budgets}
    tuner_s, launches, asks = 0.0, 0, 0
    for seed in seeds:
        if name in PLANNED:
            for b in budgets:
                run = fn(sc, seed, b, noise, tmp, **kw)
                per_budget[b].append(score(sc, run, b))
                if fn is run_kttune:
                    PROBE_STATS.append((sc.space.name, b, run))
                    tuner_s, launches, asks = tuner_s + run.tuner_s, launches + len(run.launches), asks + run.asks
        else:
            run = fn(sc, seed, max(budgets), noise, tmp, **kw)
            tuner_s, launches, asks = tuner_s + run.tuner_s, launches + len(run.launches), asks + run.asks
            for b in budgets:
                per_budget[b].append(score(sc, run, b))
    ms_launch = 1000 * tuner_s / launches if launches and tuner_s else float("nan")
    ms_ask = 1000 * tuner_s / asks if asks and tuner_s else float("nan")
    return {b: summarize(s) for b, s in per_budget.items()}, ms_launch, ms_ask


def print_table(title: str, rows: list[tuple[str, dict[int, dict[str, float]], float, float]],
                budgets: Sequence[int]) -> None:
    print(f"\n{title}")
    head = "| method | " + " | ".join(f"B={b}: median (p10, min) / deployable: median (min) / rec / found / meas / wasted / "
                                   "pick fails / redeploy (min) / lucky pools"
                                   for b in budgets) + \
           " | tuner ms per launch (per ask) |"
    print(head)
    print("|" + "---|" * (len(budgets) + 2))
    for name, res, ms_launch, ms_ask in rows:
        cells = []
        for b in budgets:
            r = res[b]
            cells.append(f"{r['median']:.3f} ({r['p10']:.3f}, {r['min']:.3f}) / {r['dep_median']:.3f} ({r['dep_min']:.3f}) / "
                         f"{r['rec']:.3f} / {r['found']:.3f} / "
                         f"{r['meas']:.3f} / "
                         f"{r['wasted']:.1f} / {100 * r['pick_fails']:.0f} % / {r['redeploy']:.3f} ({r['redeploy_min']:.3f}) / "
                         f"{r['lucky']:.0f}")
        tim = "-" if math.isnan(ms_launch) else f"{ms_launch:.0f} ({ms_ask:.0f})"
        print(f"| {name} | " + " | ".join(cells) + f" | {tim} |")


def print_probe_table() -> None:
    """Early stop: per space and budget, over kttune runs (all variants)."""
    if not PROBE_STATS:
        return
    print("\n## early stop: pruned launches per run / benchmark time saved (net of probes) / "
          "best pruned config ÷ optimum (max over runs) / runs that pruned a config within 1 % of the optimum")
    print("| space | budget | pruned per run | bench time saved | best pruned | optimum pruned |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(s, b) for s, b, _ in PROBE_STATS})
    for space, b in keys:
        runs = [r for s, bb, r in PROBE_STATS if (s, bb) == (space, b)]
        full = sum(r.bench_s + r.saved_s for r in runs)
        saved = sum(r.saved_s for r in runs)
        print(f"| {space} | {b} | {statistics.mean(r.pruned for r in runs):.1f} | "
              f"{100 * saved / full if full else 0:.0f} % | {max(r.pruned_best for r in runs):.3f} | "
              f"{sum(r.pruned_best >= 0.99 for r in runs)} of {len(runs)} |")


# ----------------------------------------------------------------------------- full path


def full_path_check(space_path: str, budget: int, seed: int, *, noise_off: bool = False) -> None:
    """`kttune run` for real (simulated server processes + the real bench client), then the
    in-process model on the same configurations. noise_off: the server runs with
    --sim-noise 0, so both sides are deterministic and only the path differs."""
    space = load_space(REPO / space_path, check_paths=False)
    grid = SpaceGrid(space)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = tmp / "fp.db"
        if noise_off:
            data = yaml.safe_load((REPO / space_path).read_text())
            data["server"]["args"]["sim-noise"] = 0
            space_path = str(tmp / "space.yaml")
            Path(space_path).write_text(yaml.safe_dump(data, sort_keys=False))
        cmd = [sys.executable, "-m", "tuner.cli", "run", "--space", space_path, "--budget", str(budget),
               "--seed", str(seed), "--study", "fp", "--storage", f"sqlite:///{db}", "--studies-dir", str(tmp / "s")]
        started = time.monotonic()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
        if res.returncode != 0:
            print(res.stdout[-2000:], res.stderr[-2000:])
            raise SystemExit(f"kttune run failed with {res.returncode}")
        study = optuna.load_study(study_name="fp", storage=f"sqlite:///{db}")
        trials = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    print(f"\nfull path{' (server noise off)' if noise_off else ''}: `kttune {' '.join(cmd[3:])}` — "
          f"{len(trials)} launches in {wall:.0f} s")
    print("| trial | config | kttune run (real processes) | in-process, noise off | ratio | in-process, 20 noisy draws (min-max) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for t in trials:
        params = dict(t.params)
        ev = grid.evaluate(params)
        pred = grid.values_of(params)
        reason = t.user_attrs.get(ATTR_REASON)
        noisy = []
        for s in range(1 if noise_off else 20):
            r = InProcessRunner(seed=1000 + s, noise_sigma=0.0 if noise_off else 0.025)
            with tempfile.TemporaryDirectory() as d:
                o = r(space, space.launch_flags(params), Path(d) / "t").outcome
            noisy.append(o.values[0] if o.ok and o.values else float("nan"))
        measured = t.values[0] if reason is None and t.values else None
        cfg = " ".join(f"{k.replace('kt-', '')}={v}" for k, v in params.items())
        if measured is not None and pred is not None:
            ratios.append(measured / pred[0])
            print(f"| {t.number} | {cfg} | {measured:.2f} | {pred[0]:.2f} | {measured / pred[0]:.3f} | "
                  f"{min(noisy):.2f}-{max(noisy):.2f} |")
        else:
            print(f"| {t.number} | {cfg} | {reason or 'ok'} | {'ok' if ev.feasible else ev.reason} | - | - |")
    if ratios:
        print(f"ratio real/in-process: mean {statistics.mean(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} launches")
    print_overheads(trials, study.trials)


def print_overheads(launched: list[optuna.trial.FrozenTrial], every: list[optuna.trial.FrozenTrial]) -> None:
    """Issue 6 item 5 on real processes: per launch, the tuner's own time (the trial's wall
    time outside server start, quality check, benchmarks and teardown, plus the gap before the
    next trial), and teardown to the next launch (teardown + that gap)."""
    print("| trial | server start s | quality + bench s | teardown s | tuner s in trial | gap to next trial s | "
          "teardown to next launch s |")
    print("|---|---|---|---|---|---|---|")
    starts = sorted(t.datetime_start for t in every if t.datetime_start is not None)
    tuner, to_next = [], []
    for t in launched:
        tm = timings_of(t)
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        busy = sum(v for k, v in tm.items() if k.startswith("bench_") or k == "quality_s")
        ready, down = float(tm.get("ready_s", 0.0)), float(tm.get("teardown_s", 0.0))
        inside = wall - ready - busy - down
        later = [s for s in starts if s >= t.datetime_complete]
        gap = (later[0] - t.datetime_complete).total_seconds() if later else float("nan")
        tuner.append(inside + (0.0 if math.isnan(gap) else gap))
        if not math.isnan(gap):
            to_next.append(down + gap)
        print(f"| {t.number} | {ready:.2f} | {busy:.2f} | {down:.2f} | {inside:.2f} | {gap:.2f} | {down + gap:.2f} |")
    if tuner:
        print(f"tuner time per launch outside start/quality/bench/teardown: mean {statistics.mean(tuner):.2f} s, "
              f"max {max(tuner):.2f} s (goal ≤ 1 s)" + (f"; teardown to next launch: max {max(to_next):.2f} s "
                                                        "(goal ≤ 5 s + GPU memory release)" if to_next else ""))


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--space", nargs="+", default=SPACES, help="sim search spaces (default: all)")
    ap.add_argument("--noise", type=float, default=0.025)
    ap.add_argument("--variants", action="store_true", help="also run the strategy's levers one by one")
    ap.add_argument("--variant", nargs="+", choices=list(VARIANTS), help="only these variants")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--margin-gb", type=float, help="what-if: kttune's gate starts with this margin")
    ap.add_argument("--full-path", action="store_true", help="confirm the in-process model with real `kttune run`")
    ap.add_argument("--full-path-space", default="search_spaces/sim-qwen3-30b-a3b-1x4090.yaml")
    ap.add_argument("--full-path-budget", type=int, default=4)
    ap.add_argument("--full-path-only", action="store_true", help="only the full-path confirmation")
    ap.add_argument("--confirm", type=int, help="kttune's confirmation launches (default: the space's, 2 at B ≥ 10)")
    ap.add_argument("--no-probe", action="store_true", help="kttune without the early-stop probe")
    ap.add_argument("--no-recheck", action="store_true", help="kttune without re-measuring narrow leaders")
    ap.add_argument("--boundary-failures", type=int,
                    help="kttune's allowance of failed launches inside the safety margin (default: the space's, 1)")
    ap.add_argument("--placement", action="store_true", help="only the placement table (benchmarks/placement_quality.py)")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.placement:
        from benchmarks.placement_quality import placement_table
        print(placement_table(seeds=range(args.first_seed, args.first_seed + (3 if args.quick else args.seeds)),
                              noise=args.noise))
        return 0
    if args.full_path_only:
        full_path_check(args.full_path_space, args.full_path_budget, 0, noise_off=True)
        full_path_check(args.full_path_space, args.full_path_budget, 0)
        return 0
    seeds = list(range(args.first_seed, args.first_seed + (3 if args.quick else args.seeds)))
    budgets = sorted(args.budgets)
    print(f"# tuning quality: seeds {seeds[0]}..{seeds[-1]}, budgets {budgets}, noise sigma {args.noise}"
          + (f", gate margin {args.margin_gb} GB" if args.margin_gb is not None else ""))
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for path in args.space:
            sc = load_scene(path)
            if args.no_recheck:
                sc.space = replace(sc.space, confirm=replace(sc.space.confirm, recheck=False))
            if args.boundary_failures is not None:
                sc.space = replace(sc.space, feasibility=FeasibilitySpec(boundary_failures=args.boundary_failures))
            rows = []
            for name in args.methods:
                kw: dict[str, Any] = {}
                if name == "kttune":
                    kw = {"confirm": args.confirm, "probe": not args.no_probe}
                    if args.margin_gb is not None:
                        kw["margin_gb"] = args.margin_gb
                rows.append((name, *evaluate(sc, name, METHODS[name], seeds, budgets, args.noise, tmp, **kw)))
            if args.variants or args.variant:
                for vname, strat in VARIANTS.items():
                    if args.variant and vname not in args.variant:
                        continue
                    kw = {"strategy": strat, "confirm": args.confirm, "probe": not args.no_probe}
                    if args.margin_gb is not None:
                        kw["margin_gb"] = args.margin_gb
                    rows.append((f"kttune: {vname}", *evaluate(sc, "kttune", run_kttune, seeds, budgets,
                                                                args.noise, tmp, **kw)))
            opt = sc.grid.optimum().entries[0]
            print_table(f"## {sc.space.name}: optimum {opt.objective} = {opt.value:.4g} "
                        f"({' '.join(f'{k}={v}' for k, v in opt.params.items())}); deployable optimum "
                        f"{sc.deployable:.4g} ({sc.deployable / opt.value:.3f} of it)", rows, budgets)
    print_probe_table()
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.full_path:
        full_path_check(args.full_path_space, args.full_path_budget, 0, noise_off=True)
        full_path_check(args.full_path_space, args.full_path_budget, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
