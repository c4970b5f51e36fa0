"""A TrialRunner that asks the simulator's model instead of launching `python -m tuner.sim`.

For benchmarks that need thousands of trials (tuning quality over many seeds): no process, no
HTTP, no bench client, milliseconds per trial. It follows the simulated server as the tuner
sees it through the real path:

* the same start-up check (with the ±oom_band OOM fuzz of a noisy server) and the same
  log lines, written to `server.log`, so the feasibility gate calibrates from them and the
  failure reason comes from the same log classifier (`oom_weights`, `kv_not_enough_memory`,
  `cuda_graph_failed`, `scheduler_dead`, ...);
* a server whose forward runs out of GPU memory under load is `oom`, refused requests `bench_incomplete`;
* metrics keyed `workload.metric` in real-hardware units, like `tuner.bench` after it undoes
  the time scale;
* noise as the engine draws it: one multiplicative LogNormal(0, sigma) per run plus the
  scenario's chance of a 5-15 % slower run (per-step jitter averages out over a workload and
  is left out).

`benchmarks/tuning_quality.py --full-path` checks that real `kttune run` trials agree.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuner import outcome
from tuner.bench import REQUEST_TOO_LONG
from tuner.config import SearchSpace, split_env
from tuner.server import RECORDER_DIR_ENV, classify_failure, flag_args, parse_memory_lines, silent_fallback
from tuner.sim.args import PROG, UsageError, parse_args, to_sim_config
from tuner.sim.optimum.evaluator import SimEvaluator
from tuner.sim.optimum.traces import METRICS
from tuner.sim.perfmodel.startup import StartupResult, startup_check
from tuner.sim.recording import record_dump
from tuner.sim.scenario import Scenario, load_scenario
from tuner.trial import TrialRun, recording_flags, server_argv, server_env

_RATE_SUFFIXES = ("_throughput",)
_TIME_SUFFIXES = ("_ms",)
_SCHED_EXC = ["Scheduler hit an exception:",
              "Received sigquit from a child process. It usually means the child failed."]


def run_multiplier(scn: Scenario, sigma: float, seed: int) -> float:
    """Step-time factor of one server run, drawn the way `engine.Engine` draws it."""
    if sigma <= 0:
        return 1.0
    rng = random.Random(f"engine/{seed}")
    multiplier = math.exp(rng.gauss(0.0, sigma))
    if rng.random() < scn.c("slow_run_prob"):
        multiplier *= rng.uniform(1.05, 1.15)
    return multiplier


def apply_noise(metrics: Mapping[str, float], multiplier: float) -> dict[str, float]:
    """Slower steps: rates divide by the factor, durations and latencies multiply."""
    out = {}
    for key, value in metrics.items():
        metric = key.rpartition(".")[2]
        if metric.endswith(_RATE_SUFFIXES):
            value = value / multiplier
        elif metric == "duration" or metric.endswith(_TIME_SUFFIXES):
            value = value * multiplier
        out[key] = value
    return out


def startup_log(st: StartupResult) -> list[str]:
    """The start-up part of the simulated server's log, ending the way its launcher ends."""
    lines = list(st.log_lines)
    if st.ok:
        return lines + ["The server is fired up and ready to roll!"]
    errors = list(st.error_lines)
    if st.stage == "warmup":
        return lines + ["Initialization failed. warmup error: " + "\n".join(errors)]
    if st.stage in ("args", None) or any("scheduler is dead" in e for e in errors):
        return lines + errors
    if not any(e.startswith("Scheduler hit an exception") for e in errors):
        errors = _SCHED_EXC[:1] + errors + _SCHED_EXC[1:]
    return lines + errors


class InProcessRunner:
    """`TrialRunner` (see `tuner.trial.protocols`) backed by `tuner.sim` in this process.

    Each call is one simulated launch with its own noise draw, seeded from `seed` and the
    call count, so a benchmark run is reproducible. `noise_sigma=0` gives the model's exact
    noise-free figures (no OOM fuzz either). Runners given the same `cache` dict share the
    model's traces (many benchmark runs of one scenario)."""

    def __init__(self, *, noise_sigma: float = 0.025, seed: int = 0, scenario: str | None = None,
                 cache: dict[Any, Any] | None = None) -> None:
        self.noise_sigma = noise_sigma
        self.seed = seed
        self.scenario = scenario
        self.launches = 0
        self.busy_s = 0.0           # time spent inside calls (the benchmark's "launch" time)
        cache = {} if cache is None else cache
        self._scenarios: dict[str, Scenario] = cache.setdefault("scenarios", {})
        self._evaluators: dict[tuple[Any, ...], SimEvaluator] = cache.setdefault("evaluators", {})

    def _evaluator(self, scn: Scenario, space: SearchSpace) -> SimEvaluator:
        shapes = tuple((w.name, (w.num_prompts, w.input_len, w.output_len)) for w in space.workloads)
        key = (scn.name, shapes)
        ev = self._evaluators.get(key)
        if ev is None:
            ev = self._evaluators[key] = SimEvaluator(scn, dict(shapes))
        return ev

    def __call__(self, space: SearchSpace, flags: dict[str, Any], trial_dir: Path, *,
                 on_phase: Callable[[str], None] | None = None, record_experts: bool = False) -> TrialRun:
        started = time.perf_counter()
        try:
            return self._run(space, flags, trial_dir, on_phase, record_experts)
        finally:
            self.busy_s += time.perf_counter() - started

    def _run(self, space: SearchSpace, flags: dict[str, Any], trial_dir: Path,
             on_phase: Callable[[str], None] | None, record_experts: bool) -> TrialRun:
        phase = on_phase or (lambda _p: None)
        self.launches += 1
        launch_seed = random.Random(f"inprocess/{self.seed}/{self.launches}").randrange(2**31)
        trial_dir.mkdir(parents=True, exist_ok=True)
        if record_experts:
            flags = recording_flags(flags, trial_dir)
        argv = server_argv(space, flags, space.server.port or 30000)
        env = server_env(space, flags)
        run = TrialRun(outcome=outcome.failure(space, "not_started", ""), argv=argv, trial_dir=trial_dir)
        phase("launching")
        try:
            args = parse_args(flag_args(split_env(flags)[0]) + ["--host", space.server.host, "--port", "30000"])
        except UsageError as exc:
            text = f"{exc.usage}{PROG}: error: {exc}"
            self._write(run, [text])
            run.outcome = outcome.failure(space, classify_failure(text) or "exited_rc_2", text)
            return run
        name = self.scenario or args.sim.scenario
        scn = self._scenarios.get(name)
        if scn is None:
            scn = self._scenarios[name] = load_scenario(name)
        cfg = to_sim_config(args, env)
        noisy = self.noise_sigma > 0
        st = startup_check(scn, cfg, fuzz_seed=launch_seed if noisy else None)
        lines = startup_log(st)
        run.timings["ready_s"] = round(st.load_time_s, 3)
        if not st.ok:
            self._write(run, lines)
            text = "\n".join(lines)
            run.outcome = outcome.failure(space, classify_failure(text, include_warnings=False) or "exited_rc_1",
                                            text[-2000:])
            return run
        fallback = silent_fallback("\n".join(lines))
        if fallback is not None:
            self._write(run, lines)
            run.outcome = outcome.failure(space, fallback.reason, f"the server ignored its configuration: {fallback.line}")
            return run
        ev = self._evaluator(scn, space).evaluate(cfg, st, dict.fromkeys((w.name for w in space.workloads), METRICS),
                                                  fuzz_seed=launch_seed if noisy else None)
        mult = run_multiplier(scn, self.noise_sigma, launch_seed)
        metrics = apply_noise(ev.metrics, mult)
        for w in space.workloads:
            if f"{w.name}.duration" in metrics:
                phase(f"benchmarking {w.name}")
                run.timings[f"bench_{w.name}_s"] = round(metrics[f"{w.name}.duration"], 3)
        if ev.feasible:
            run.outcome = outcome.success(space, metrics, {})
            if record_experts and args.server.get("expert_distribution_recorder_mode"):
                routed = sum(w.num_prompts * (w.input_len + w.output_len) for w in space.workloads)
                dump = record_dump(scn, routed, Path(env[RECORDER_DIR_ENV]), seed=launch_seed)
                lines.append(f"Write expert distribution to {dump}")
                run.expert_distribution = str(dump)
        else:
            reason, line = _runtime_reason(ev.reason or "")
            lines.append(line)
            run.outcome = outcome.failure(space, reason, ev.reason or "", metrics)
        phase("tearing down")
        self._write(run, lines)
        return run

    @staticmethod
    def _write(run: TrialRun, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        (run.trial_dir / "server.log").write_text(text)
        run.memory = parse_memory_lines(text)


def _runtime_reason(message: str) -> tuple[str, str]:
    """(outcome reason, log line) for a failure during the benchmark."""
    if "out of memory" in message:
        return "oom", "torch.OutOfMemoryError: CUDA out of memory. " + message
    if "stalled" in message:
        return "bench_timeout", message
    if REQUEST_TOO_LONG.search(message):
        return "request_too_long", message
    return "bench_incomplete", message
