"""One-call prediction: startup feasibility plus noise-free benchmark results for a config."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tuner.sim.engine import WorkloadResult, run_workload
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.perfmodel.startup import StartupResult, startup_check
from tuner.sim.scenario import Scenario

#: The seed document's two bench_serving jobs: (num_prompts, input_len, output_len).
SEED_WORKLOADS: Mapping[str, tuple[int, int, int]] = {
    "prefill": (37, 1024, 1),
    "decode": (37, 10, 512),
}


@dataclass(frozen=True)
class Prediction:
    feasible: bool                     # starts, and no workload hit a runtime failure
    reason: str | None                 # first failure line, with its stage
    mem_per_gpu_gb: dict[str, float]   # predicted footprint per GPU (GiB); "excess" > 0 = over
    workloads: dict[str, WorkloadResult]
    startup: StartupResult


def predict(scenario: Scenario, cfg: SimConfig,
            workloads: Mapping[str, tuple[int, int, int]] | None = None) -> Prediction:
    """Startup check, then each workload through the virtual-time scheduler with noise off."""
    startup = startup_check(scenario, cfg)
    if not startup.ok:
        first = startup.error_lines[0] if startup.error_lines else "startup failed"
        return Prediction(False, f"{startup.stage}: {first}", startup.mem_per_gpu_gb, {}, startup)
    results: dict[str, WorkloadResult] = {}
    reason: str | None = None
    for name, (num_prompts, input_len, output_len) in (workloads or SEED_WORKLOADS).items():
        res = run_workload(scenario, cfg, num_prompts=num_prompts, input_len=input_len,
                           output_len=output_len, noise_sigma=0.0)
        results[name] = res
        if reason is None and res.fatal:
            reason = f"runtime ({name}): {res.fatal}"
    return Prediction(reason is None, reason, startup.mem_per_gpu_gb, results, startup)
