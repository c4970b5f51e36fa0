"""The sweep a search space asks for, the worker that runs it, and what it rules out.

- **Shape**: hidden size, moe_intermediate_size, routed experts and top-k from the model's
  config.json (the space's ``model:`` block applied), stored as the space's kt-method.
- **Points**: the kt-cpuinfer and kt-threadpool-count values the space allows (its params'
  grids, else the fixed flags); **batches**: decode batches 1, 2, 4, … up to the largest
  max-running-requests the space allows and the workloads offer, and one prefill chunk (the
  smallest chunked-prefill-size it allows).
- **Avoid**: the points the prescreen rules out, which `kttune run`'s local search skips
  (its distributions, baseline and warm start stay as they are).
- **Worker**: ``server.python`` running kt-kernel; for a simulated space the simulator's CPU
  model of the scenario's machine (``python -m tuner.sim.cpubench``), a test double that plays
  the kernels' part and prints the same lines.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.config import SearchSpace
from tuner.cpubench.sweep import Shape, SweepPlan, Worker
from tuner.errors import ConfigError
from tuner.machine import load_model_sizes, resolve_hardware
from tuner.search import param_grid

SIM_WORKER = "tuner.sim.cpubench"
CPUINFER, THREADPOOL = "kt-cpuinfer", "kt-threadpool-count"


def _values(space: SearchSpace, flag: str) -> list[Any]:
    spec = next((p for p in space.params if p.flag == flag), None)
    if spec is not None:
        return param_grid(spec)
    value = space.server.args.get(flag)
    return [value] if value is not None else []


def _ints(values: Sequence[Any]) -> list[int]:
    return sorted({int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0})


def free_cores(space: SearchSpace) -> int:
    """Physical cores left by the GPU ranks (one busy thread each) of the target machine."""
    tp = int(space.server.args.get("tensor-parallel-size") or space.server.args.get("tp-size") or 1)
    return max(1, resolve_hardware(space.hardware or None).cpu.physical_cores - tp)


def plan_for_space(space: SearchSpace, *, threads: Sequence[int] | None = None, pools: Sequence[int] | None = None,
                   method: str | None = None, repeats: int = 3, min_time_s: float = 0.6) -> SweepPlan:
    args = space.server.args
    model = load_model_sizes(str(args.get("model-path", args.get("model"))), space.model or None)
    kt_method = method or args.get("kt-method") or next(iter(_values(space, "kt-method")), None)
    if not kt_method:
        raise ConfigError("server.args.kt-method: cpubench needs the CPU experts' format; set it or pass --method")
    shape = Shape(str(kt_method).upper(), model.n_routed_experts, model.top_k, model.hidden_size, model.moe_intermediate_size)
    thread_values = list(threads) if threads else _ints(_values(space, CPUINFER))
    pool_values = list(pools) if pools else (_ints(_values(space, THREADPOOL)) or [1])
    if not thread_values:
        raise ConfigError(f"{CPUINFER}: neither a param nor a server arg of the space; pass --threads")
    offered = max((w.offered for w in space.workloads), default=1)
    top = min(max(_ints(_values(space, "max-running-requests")) or [offered]), offered)
    decode = sorted({1 << n for n in range(top.bit_length()) if 1 << n <= top} | {top})
    chunks = _ints(_values(space, "chunked-prefill-size"))
    prompt = max((w.input_len for w in space.workloads), default=0)
    prefill = min(chunks[0] if chunks else 8192, max(prompt * offered, decode[-1] + 1))
    batches = tuple(sorted(set(decode) | {prefill}))
    return SweepPlan(shape, tuple(thread_values), tuple(pool_values), batches,
                     prefill if prefill > decode[-1] else None, repeats=repeats, min_time_s=min_time_s)


def worker_for_space(space: SearchSpace, simulated: bool) -> Worker:
    python = str(space.server.command[0] if space.server.command else space.server.python)
    if not simulated:
        return Worker.kt_kernel(python, space.server.env)
    scenario = space.server.args.get("sim-scenario")
    if scenario is None:
        raise ConfigError("server.args.sim-scenario: a simulated space needs it for the CPU model cpubench uses")
    return Worker((python, "-m", SIM_WORKER), dict(space.server.env),
                  {"scenario": str(scenario), "noise": float(space.server.args.get("sim-noise", 0.025))})


class Avoid:
    """The (kt-cpuinfer, kt-threadpool-count) points the prescreen ruled out, as a test on a
    proposal's params (the space's fixed flags fill a knob it does not search)."""

    def __init__(self, space: SearchSpace, ruled_out: Sequence[tuple[int, int]]) -> None:
        self.points = frozenset(ruled_out)
        self._fixed = (space.server.args.get(CPUINFER), space.server.args.get(THREADPOOL) or 1)

    def __call__(self, params: Mapping[str, Any]) -> bool:
        point = (params.get(CPUINFER, self._fixed[0]), params.get(THREADPOOL, self._fixed[1]))
        return point in self.points

    def __bool__(self) -> bool:
        return bool(self.points)


def apply_stored(space: SearchSpace, studies_dir: Path, study: str) -> tuple[Avoid | None, list[str]]:
    """What the sweep stored beside the study (`kttune cpubench`) rules out for this space's
    search, and a line saying so; None, with a line saying why, when there is none or it is for
    another layer."""
    from tuner.cpubench.prescreen import prescreen
    from tuner.cpubench.store import bench_dir, describe_age, load

    try:
        result = load(bench_dir(studies_dir, study))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, [f"cpubench: stored result unreadable ({exc}); run kttune cpubench again"]
    if result is None:
        return None, []
    try:
        wanted = plan_for_space(space).shape
    except ConfigError:
        wanted = None
    if wanted is not None and wanted != result.plan.shape:
        return None, [f"cpubench: stored result is for {result.plan.shape.describe()}, the space runs "
                      f"{wanted.describe()}; not used (run kttune cpubench again)"]
    screen = prescreen(result, free_cores=free_cores(space))
    avoid = Avoid(space, [(t, p) for t, p, _bt, _bp in screen.ruled_out])
    what = f"cpubench ({describe_age(result)}): {screen.describe()}"
    return (avoid, [what + "; the local search does not move to them"]) if avoid else (None, [what])
