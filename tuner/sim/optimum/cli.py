"""`python -m tuner.sim optimum --space FILE [--scenario NAME]`: print a space's true optimum
per objective on the simulator's model (noise off)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tuner.config import SearchSpace, load_space
from tuner.errors import KttuneError
from tuner.sim.optimum.grid import OptimumResult, SpaceGrid


def format_result(res: OptimumResult) -> str:
    lines = [f"space {res.space} on scenario {res.scenario}: {res.grid_size} configurations, "
             f"{res.feasible} feasible ({res.seconds:.1f} s)"]
    if res.inert:
        lines.append(f"ignored by the simulator (any value): {', '.join(res.inert)}")
    if not res.entries:
        lines.append("no configuration of the grid starts and completes every workload")
    for e in res.entries:
        near = ", ".join(f"{share:.1%} within {k}" for k, share in e.near.items())
        lines.append(f"{e.objective} ({e.direction}): {e.value:.6g}  [{e.ties} tied; {near}]")
        lines.append("  " + " ".join(f"{k}={v}" for k, v in e.params.items()))
    return "\n".join(lines)


def optimum(space: SearchSpace | str, scenario: str | None = None) -> OptimumResult:
    sp = load_space(space, check_paths=False) if isinstance(space, str) else space
    return SpaceGrid(sp, scenario).optimum()


def main(argv: Sequence[str] | None = None) -> int:
    """`optimum --space FILE [--scenario NAME]`: print the true optimum per objective."""
    parser = argparse.ArgumentParser(prog="python -m tuner.sim optimum",
                                     description="Enumerate a search space's grid on the simulator's model "
                                                 "(noise off) and print the true optimum per objective.")
    parser.add_argument("--space", required=True, help="search-space YAML")
    parser.add_argument("--scenario", help="simulator scenario (default: the space's sim-scenario)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        print(format_result(optimum(args.space, args.scenario)))
    except KttuneError as exc:
        print(f"optimum: error: {exc}", file=sys.stderr)
        return 2
    return 0
