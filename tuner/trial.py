"""One launched trial: start the server → wait until really ready → run each workload →
tear the whole tree down. Returns a TrialOutcome; never raises for a server/bench fault."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner import objective
from tuner.bench import run_workload
from tuner.errors import BenchmarkError, ServerLaunchError, TeardownError
from tuner.objective import TrialOutcome
from tuner.server import find_free_port, is_alive, parse_memory_lines, start_server, stop_server, wait_ready
from tuner.server.argv import build_server_argv
from tuner.space import SearchSpace

PhaseCallback = Callable[[str], None]


@dataclass
class TrialRun:
    """What a launched trial leaves behind besides its outcome (stored as user attrs)."""

    outcome: TrialOutcome
    argv: list[str]
    trial_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    def log_text(self) -> str:
        return _read(self.trial_dir / "server.log")


def trial_port(space: SearchSpace) -> int:
    """A fresh free port per trial (same-port restarts are known to hang), unless fixed."""
    host = space.server.host
    if space.server.port is not None:
        return space.server.port
    return find_free_port(host)


def server_argv(space: SearchSpace, flags: Mapping[str, Any], port: int) -> list[str]:
    return build_server_argv(space.server.launcher(), flags, host=space.server.host, port=port)


def bench_tokenizer(space: SearchSpace, flags: Mapping[str, Any]) -> str | None:
    if space.bench.tokenizer:
        return space.bench.tokenizer
    tok = flags.get("tokenizer-path") or flags.get("model-path") or flags.get("model")
    return str(tok) if tok else None


def run_trial(space: SearchSpace, flags: Mapping[str, Any], trial_dir: Path, *,
              on_phase: PhaseCallback | None = None, teardown_gpu_timeout_s: float = 120.0) -> TrialRun:
    phase = on_phase or (lambda _p: None)
    trial_dir.mkdir(parents=True, exist_ok=True)
    host = space.server.host
    port = trial_port(space)
    argv = server_argv(space, flags, port)
    (trial_dir / "server.argv.json").write_text(json.dumps(argv, indent=1))
    run = TrialRun(outcome=objective.failure(space, "not_started", ""), argv=argv, trial_dir=trial_dir)
    phase("launching")
    try:
        handle = start_server(argv, log_path=trial_dir / "server.log", host=host, port=port,
                              env=dict(space.server.env))
    except ServerLaunchError as exc:  # port taken before launch, interpreter cannot start
        run.outcome = objective.failure(space, exc.reason, str(exc))
        return run
    metrics: dict[str, float] = {}
    try:
        try:
            run.timings["ready_s"] = wait_ready(handle, timeout_s=space.server.start_timeout_s)
            run.memory = parse_memory_lines(_read(handle.log_path))
            for w in space.workloads:
                phase(f"benchmarking {w.name}")
                res = run_workload(space.bench, w, host=host, port=port, trial_dir=trial_dir,
                                   tokenizer=bench_tokenizer(space, flags),
                                   server_alive=lambda: is_alive(handle))
                metrics.update({f"{w.name}.{k}": v for k, v in res.metrics.items()})
                run.timings[f"bench_{w.name}_s"] = res.wall_s
            run.outcome = objective.success(space, metrics, {})
        except ServerLaunchError as exc:
            run.outcome = objective.failure(space, exc.reason, str(exc), metrics)
        except BenchmarkError as exc:
            # A server that died under load is the config's fault (e.g. runtime OOM).
            reason = exc.reason
            if reason in ("bench_no_result", "bench_incomplete") and not is_alive(handle):
                reason = "server_died"
            run.outcome = objective.failure(space, reason, str(exc), metrics)
    finally:
        phase("tearing down")
        try:
            report = stop_server(handle, gpu_timeout_s=teardown_gpu_timeout_s)
            run.timings["teardown_s"] = report.duration_s
        except TeardownError as exc:
            run.outcome = objective.failure(space, "teardown_stuck", str(exc), metrics)
    if not run.memory:
        run.memory = parse_memory_lines(_read(handle.log_path))
    return run


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
