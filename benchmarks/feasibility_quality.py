"""Feasibility quality: how well kttune's pre-launch predictor
(`tuner.feasibility`, through its `FeasibilityGate`) knows the simulated machines. Prints
tables; not a test.

    python benchmarks/feasibility_quality.py            # 10 seeds (~1 min on 2 cores)
    python benchmarks/feasibility_quality.py --quick    # 3 seeds

Per sim search space:
1. memory failures among the launches of a 20-launch `run_study` (in-process simulated
   server, noise on; goal <= 5 %), for kttune's default strategy and for a plain TPE study
   that only the gate protects;
2. whether the predictor rejects the true optimum (`tuner.sim.optimum`), before any launch
   and after one baseline launch's log anchors it (`FeasibilityGate.observe`: predictions
   become observed + model difference); and the best true value
   among the configurations it would let through (the ceiling of any gated search);
3. predicted vs simulated per-GPU memory on a grid of configurations (the sum of what the
   server holds at run time: context, weights, KV, req pool, graphs, activations, layerwise
   slot; the predictor's safety margin is not part of it; goal within 5 %), before and after
   calibration, and with the state a 20-launch study stored (seed 0), per component too.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tuning_quality import SPACES, VARIANTS, Scene, load_scene, run_kttune  # noqa: E402

from tuner.feasibility import FeasibilityGate  # noqa: E402
from tuner.loop import RunOptions, run_study  # noqa: E402
from tuner.search import param_grid  # noqa: E402
from tuner.sim.inprocess import InProcessRunner  # noqa: E402
from tuner.sim.perfmodel.startup import startup_check  # noqa: E402
from tuner.storage import STUDY_ATTR_CALIBRATION  # noqa: E402

GIB_GB = (1 << 30) / 1e9
MEMORY_FAILURES = frozenset({"oom", "oom_weights", "oom_kv_alloc", "kv_not_enough_memory", "cuda_graph_failed",
                             "server_died"})
# predictor breakdown key -> simulator footprint key
COMPONENTS = {"weights": (("weights_nonexpert", "gpu_experts", "staging"), ("weights",)),
              "kv": (("kv",), ("kv",)), "req_pool": (("req_pool",), ("req_pool",)),
              "graphs": (("cuda_graphs",), ("graphs",)), "activations": (("activations",), ("activations",)),
              "slot": (("layerwise_slot",), ("slot",)), "context": (("cuda_context",), ("context",))}


def calibrated_gate(sc: Scene) -> FeasibilityGate:
    """A gate after one baseline launch, as a study's gate is after its first trial."""
    gate = FeasibilityGate.for_space(sc.space)
    params = dict(sc.space.baseline) if sc.space.baseline else {p.flag: param_grid(p)[0] for p in sc.space.params}
    flags = gate.resolve_auto(sc.space.launch_flags(params))
    with tempfile.TemporaryDirectory() as d:
        run = InProcessRunner(noise_sigma=0)(sc.space, flags, Path(d) / "t")
        gate.observe(run.log_text(), flags, run.outcome.reason, predicted_fit=gate.check(flags).feasible)
    return gate


def studied_gate(sc: Scene, tmp: Path, seed: int = 0) -> FeasibilityGate:
    """A gate with the state a 20-launch kttune study (noise on) stored: every launch's log folded in."""
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="fq", storage=storage, budget=20, seed=seed,  # type: ignore[arg-type]
                      studies_dir=tmp / f"studied-{seed}")
    run_study(sc.space, opts, log=lambda _m: None, runner=sc.runner(seed, 0.025))
    gate = FeasibilityGate.for_space(sc.space)
    gate.restore(optuna.load_study(study_name="fq", storage=storage).user_attrs.get(STUDY_ATTR_CALIBRATION))
    return gate


def failures(sc: Scene, seeds: Sequence[int], tmp: Path) -> list[tuple[str, float, int, int]]:
    rows = []
    for name, strat in (("kttune (default strategy)", None), ("tpe, gate only", VARIANTS["tpe (old default)"])):
        mem = launches = 0
        for seed in seeds:
            run = run_kttune(sc, seed, 20, 0.025, tmp, strategy=strat)
            launches += len(run.launches)
            mem += sum(1 for x in run.launches if x.reason in MEMORY_FAILURES)
        rows.append((name, mem / max(launches, 1), mem, launches))
    return rows


def optimum_vs_gate(sc: Scene) -> dict[str, Any]:
    opt = sc.grid.optimum().entries[0]
    out: dict[str, Any] = {"optimum": opt.params}
    for label, gate in (("before", FeasibilityGate.for_space(sc.space)), ("after", calibrated_gate(sc))):
        flags = gate.resolve_auto(sc.space.launch_flags(opt.params))
        rep = gate.check(flags)
        out[f"{label}_accepts_optimum"] = rep.feasible
        out[f"{label}_binding"] = None if rep.feasible else gate.summary(rep)
        ceiling = None
        for value, params in sc.grid.ranked(0.15):
            if gate.check(gate.resolve_auto(sc.space.launch_flags(params))).feasible:
                ceiling = (value / sc.optimum, params)
                break
        out[f"{label}_ceiling"] = ceiling
    return out


def memory_grid(sc: Scene) -> list[dict[str, Any]]:
    """Configurations: the capacity flag at 6 levels x every chunk x 3 max-running levels,
    other knobs at the baseline (or the middle)."""
    base = dict(sc.space.baseline or {p.flag: param_grid(p)[len(param_grid(p)) // 2] for p in sc.space.params})
    axes = []
    for p in sc.space.params:
        grid = param_grid(p)
        if p.flag == "kt-num-gpu-experts":
            axes.append([(p.flag, grid[round(i * (len(grid) - 1) / 5)]) for i in range(6)])
        elif p.flag == "chunked-prefill-size":
            axes.append([(p.flag, v) for v in grid])
        elif p.flag == "max-running-requests":
            axes.append([(p.flag, grid[0]), (p.flag, base.get(p.flag, grid[-1])), (p.flag, grid[-1])])
    return [{**base, **dict(combo)} for combo in itertools.product(*axes)]


def memory_errors(sc: Scene, gate: FeasibilityGate) -> dict[str, Any]:
    errs: list[float] = []
    comp_err: dict[str, list[float]] = {k: [] for k in COMPONENTS}
    worst: tuple[float, dict[str, Any]] | None = None
    for params in memory_grid(sc):
        flags = gate.resolve_auto(sc.space.launch_flags(params))
        pred = gate.check(flags).breakdown_gb
        sim = startup_check(sc.grid.scn, sc.grid.sim_config(params)).mem_per_gpu_gb
        if "total" not in sim:
            continue
        p_tot = sum(pred[k] for keys, _ in COMPONENTS.values() for k in keys)
        s_tot = sim["total"] * GIB_GB
        e = (p_tot - s_tot) / s_tot
        errs.append(e)
        if worst is None or abs(e) > abs(worst[0]):
            worst = (e, params)
        for name, (pk, sk) in COMPONENTS.items():
            comp_err[name].append(sum(pred[k] for k in pk) - sum(sim[k] for k in sk) * GIB_GB)
    return {"n": len(errs), "mean_abs": statistics.mean(abs(e) for e in errs), "max_abs": max(abs(e) for e in errs),
            "within_5": sum(abs(e) <= 0.05 for e in errs) / len(errs), "bias": statistics.mean(errs),
            "worst": worst, "components": {k: (statistics.mean(v), min(v), max(v)) for k, v in comp_err.items() if v}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--space", nargs="+", default=SPACES)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    seeds = list(range(3 if args.quick else args.seeds))
    started = time.monotonic()
    print(f"# feasibility quality: seeds {seeds[0]}..{seeds[-1]}")
    with tempfile.TemporaryDirectory() as d:
        for path in args.space:
            sc = load_scene(path)
            print(f"\n## {sc.space.name}")
            print("| study (20 launches) | memory failures / launches | share (goal <= 5 %) |")
            print("|---|---|---|")
            for name, share, mem, n in failures(sc, seeds, Path(d)):
                print(f"| {name} | {mem} / {n} | {share:.1%} |")
            og = optimum_vs_gate(sc)
            print(f"\ntrue optimum {' '.join(f'{k}={v}' for k, v in og['optimum'].items())}")
            for label in ("before", "after"):
                ceil = og[f"{label}_ceiling"]
                ceil_txt = "none within 15 %" if ceil is None else \
                    f"{ceil[0]:.3f} of optimum ({' '.join(f'{k}={v}' for k, v in ceil[1].items())})"
                verdict = "accepted" if og[f"{label}_accepts_optimum"] else f"REJECTED ({og[f'{label}_binding']})"
                print(f"- predictor {label} calibration: optimum {verdict}; best config it accepts: {ceil_txt}")
            print("\n| predictor | configs | mean abs error | max abs error | within 5 % | bias (pred - sim) |")
            print("|---|---|---|---|---|---|")
            comps: dict[str, Any] = {}
            worst: dict[str, Any] = {}
            for label, gate in (("before calibration", FeasibilityGate.for_space(sc.space)),
                                ("after calibration", calibrated_gate(sc)),
                                ("after a 20-launch study", studied_gate(sc, Path(d)))):
                m = memory_errors(sc, gate)
                comps[label] = m["components"]
                print(f"| {label} | {m['n']} | {m['mean_abs']:.1%} | {m['max_abs']:.1%} | {m['within_5']:.0%} | "
                      f"{m['bias']:+.1%} |")
                worst[label] = m["worst"]
            for label, (e, params) in worst.items():
                print(f"- worst {label}: {e:+.1%} at {' '.join(f'{k}={v}' for k, v in params.items())}")
            print("\nper component, predicted - simulated GB per GPU (mean [min, max]):")
            for label, c in comps.items():
                print(f"- {label}: " + "; ".join(f"{k} {a:+.2f} [{lo:+.2f}, {hi:+.2f}]" for k, (a, lo, hi) in c.items()))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
