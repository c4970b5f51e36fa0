"""What `kttune cpubench`'s prescreen saves: kttune on each simulated space without and with the
points the prescreen rules out skipped by its local search. Prints a table; not a test.

    python benchmarks/cpu_prescreen_quality.py                        # 6 seeds, budgets 10/20 (~25 min on 2 cores)
    python benchmarks/cpu_prescreen_quality.py --seeds 12 --first-seed 6 --budgets 20

The sweep of a simulated space comes from the simulator's CPU model of that scenario's machine
(`tuner.sim.cpubench`, with the space's noise), standing in for kt-kernel's kernels: a test
double, the same one `kttune cpubench` runs on a simulated space. The prescreen and the points
it rules out are the ones `kttune run` applies (`tuner.cpubench.apply_stored`). Scores are
against the space's optimum (tuning_quality.py's truth), so a prescreen that ruled the optimum
out shows as lost quality. "launches on ruled-out points" counts, in the runs without the
prescreen, the launches at a kt-cpuinfer × kt-threadpool-count point it rules out (the baseline
and the warm start, launched whatever the prescreen says, not counted): launches it saves.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tuning_quality import SPACES, load_scene, run_kttune, score, summarize  # noqa: E402
from tuner.cpubench import Avoid, free_cores, plan_for_space, prescreen, run_sweep, worker_for_space  # noqa: E402
from tuner.sim import cpubench as sim_cpubench  # noqa: E402


def in_process(argv: Sequence[str], _env: Mapping[str, str], _timeout: float) -> tuple[int, str]:
    """The simulator's worker without a process (same lines as `python -m tuner.sim.cpubench`)."""
    out = io.StringIO()
    with redirect_stdout(out):
        rc = sim_cpubench.main(list(argv[-2:]))
    return rc, out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--space", nargs="+", default=SPACES)
    args = ap.parse_args(argv)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    seeds, budgets = range(args.first_seed, args.first_seed + args.seeds), sorted(args.budgets)
    started = time.monotonic()
    print(f"# cpubench prescreen: seeds {seeds[0]}..{seeds[-1]}, budgets {budgets}; score = true value of the pick / "
          "optimum of the shipped space, median (min) over seeds")
    print("| space | ruled out | " + " | ".join(f"B={b}: without / with prescreen" for b in budgets)
          + " | launches on ruled-out points (per run, B=" + str(budgets[-1]) + ") |")
    print("|---|---|" + "---|" * len(budgets) + "---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for path in args.space:
            sc = load_scene(path)
            flags = {p.flag for p in sc.space.params}
            if not flags & {"kt-cpuinfer", "kt-threadpool-count"}:
                continue
            plan = plan_for_space(sc.space)
            result = run_sweep(worker_for_space(sc.space, True), plan, log=lambda _m: None, run=in_process)
            screen = prescreen(result, free_cores=free_cores(sc.space))
            avoid = Avoid(sc.space, [(t, p) for t, p, _bt, _bp in screen.ruled_out])
            shipped, pre = {b: [] for b in budgets}, {b: [] for b in budgets}
            wasted = []
            for seed in seeds:
                for b in budgets:
                    run = run_kttune(sc, seed, b, 0.025, tmp)
                    shipped[b].append(score(sc, run, b))
                    if b == budgets[-1]:   # the first two launches: baseline and warm start
                        wasted.append(sum(1 for x in run.launches[2:] if avoid(x.params)))
                    run = run_kttune(sc, seed, b, 0.025, tmp, avoid=avoid)
                    pre[b].append(score(sc, run, b))
            cells = []
            for b in budgets:
                a, p = summarize(shipped[b]), summarize(pre[b])
                cells.append(f"{a['median']:.3f} ({a['min']:.3f}) / {p['median']:.3f} ({p['min']:.3f})")
            what = f"{len(avoid.points)} of {len(plan.points())} points"
            print(f"| {sc.space.name} | {what} | " + " | ".join(cells) + f" | {statistics.mean(wasted):.1f} |")
            print(json.dumps({"space": sc.space.name, "ruled_out": screen.ruled_out, "noise": round(screen.noise, 4)}),
                  file=sys.stderr)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
