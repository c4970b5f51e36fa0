"""The sweep without a search space, in any Python with kt-kernel (standard library only here):

    python -m tuner.cpubench --method AMXINT4 --experts 384 --top-k 8 --hidden 7168 --inter 2048 \\
        --threads 1-15 --pools 1,2 --batches 1,8,32,128,1024 --prefill 1024 --out cpubench-out

writes cpubench.json, table.txt (and cpubench.png where matplotlib is) to --out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuner.cpubench.store import save, table
from tuner.cpubench.sweep import Shape, SweepPlan, Worker, parse_ints, run_sweep
from tuner.errors import ConfigError, KttuneError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuner.cpubench", description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="AMXINT4")
    for name in ("experts", "top-k", "hidden", "inter"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--threads", required=True, help="e.g. 1-15")
    ap.add_argument("--pools", default="1")
    ap.add_argument("--batches", default="1,8,32,128,1024")
    ap.add_argument("--prefill", type=int, help="which batch is the prefill chunk (default: the largest)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.6, help="seconds timed per batch size")
    ap.add_argument("--python", default=sys.executable, help="the interpreter with kt-kernel (default: this one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        batches = parse_ints("--batches", args.batches)
        plan = SweepPlan(Shape(args.method.upper(), args.experts, args.top_k, args.hidden, args.inter),
                         parse_ints("--threads", args.threads), parse_ints("--pools", args.pools), batches,
                         args.prefill or batches[-1], repeats=args.repeats, min_time_s=args.min_time)
        result = run_sweep(Worker.kt_kernel(args.python), plan)
    except ConfigError as exc:
        print(f"cpubench: error: {exc}", file=sys.stderr)
        return 2
    except KttuneError as exc:
        print(f"cpubench: {exc}", file=sys.stderr)
        return 1
    files = save(result, Path(args.out))
    print(table(result))
    print(f"wrote {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
