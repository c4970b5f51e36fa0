"""`python -m tuner.sim placement-gains`: what expert placement and dynamic expert update gain
on a scenario's model, next to the published ranges they are calibrated to.

For each share of experts on the GPU (10-40 %), the noise-free throughput of one workload under
uniform placement, under `frequency` with a dump recorded on the same workload, and with a
layerwise-prefill threshold with and without dynamic expert update."""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tuner.sim.optimum.evaluator import SimEvaluator
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.perfmodel.startup import startup_check
from tuner.sim.recording import record_dump
from tuner.sim.scenario import Scenario, load_scenario

#: Gains the ktransformers expert-scheduling tutorial reports with 10-40 % of experts on GPU.
PUBLISHED = {"frequency": (0.03, 0.09), "dynamic": (0.24, 0.33)}
SHARES = (0.1, 0.2, 0.3, 0.4)


@dataclass(frozen=True)
class GainRow:
    share: float               # of the experts of a layer on the GPU
    gpu_experts: int
    uniform: float
    frequency: float
    threshold: float           # layerwise prefill above the threshold, uniform placement
    dynamic: float             # the same with dynamic expert update

    @property
    def frequency_gain(self) -> float:
        return self.frequency / self.uniform - 1

    @property
    def dynamic_gain(self) -> float:
        return self.dynamic / self.threshold - 1


def seed_config(scn: Scenario) -> SimConfig:
    """The seed deployment's flags with the native kernel, whose weights layerwise prefill streams."""
    return SimConfig(tp=scn.gpu.count, kt_weight_path="/sim/cpu-weights", kt_cpuinfer=56, kt_threadpool_count=2,
                     kt_method="RAWINT4", chunked_prefill_size=4096, max_running_requests=37,
                     max_total_tokens=37000, mem_fraction_static=0.98, enable_mixed_chunk=True)


def placement_gains(scn: Scenario, workload: tuple[int, int, int], *, threshold: int = 1024,
                    shares: Sequence[float] = SHARES, base: SimConfig | None = None,
                    metric: str = "output_throughput") -> list[GainRow]:
    base = base or seed_config(scn)
    ev = SimEvaluator(scn, {"w": workload})
    num_prompts, input_len, output_len = workload

    def value(cfg: SimConfig) -> float:
        st = startup_check(scn, cfg)
        if not st.ok:
            return float("nan")
        out = ev.evaluate(cfg, st, {"w": (metric,)})
        return out.metrics.get(f"w.{metric}", float("nan")) if out.feasible else float("nan")

    rows = []
    with tempfile.TemporaryDirectory(prefix="kttune-gains-") as tmp:
        dump = record_dump(scn, num_prompts * (input_len + output_len), Path(tmp), seed=0, stamp=0.0)
        for share in shares:
            n = round(share * scn.model.experts)
            cfg = replace(base, kt_num_gpu_experts=n)
            rows.append(GainRow(
                share, n, value(cfg),
                value(replace(cfg, kt_expert_placement_strategy="frequency", init_expert_location=str(dump))),
                value(replace(cfg, kt_gpu_prefill_token_threshold=threshold)),
                value(replace(cfg, kt_gpu_prefill_token_threshold=threshold, kt_enable_dynamic_expert_update=True))))
    return rows


def format_rows(scn: Scenario, workload: tuple[int, int, int], threshold: int, rows: Sequence[GainRow]) -> str:
    (f_lo, f_hi), (d_lo, d_hi) = PUBLISHED["frequency"], PUBLISHED["dynamic"]
    lines = [f"scenario {scn.name}, workload {workload[0]} x {workload[1]} in / {workload[2]} out, output tok/s "
             f"(noise off); threshold {threshold}",
             f"| GPU experts | uniform | frequency | gain (published {f_lo:+.0%}..{f_hi:+.0%}) | threshold | "
             f"+ dynamic update | gain (published {d_lo:+.0%}..{d_hi:+.0%}) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f_ok = "ok" if f_lo <= r.frequency_gain <= f_hi else "OUT"
        d_ok = "ok" if d_lo <= r.dynamic_gain <= d_hi else "OUT"
        lines.append(f"| {r.gpu_experts} ({r.share:.0%}) | {r.uniform:.2f} | {r.frequency:.2f} | "
                     f"{r.frequency_gain:+.1%} {f_ok} | {r.threshold:.2f} | {r.dynamic:.2f} | {r.dynamic_gain:+.1%} {d_ok} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuner.sim placement-gains", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="kimi-k2-thinking-8xl20-skewed")
    parser.add_argument("--workload", type=int, nargs=3, default=[37, 1024, 256],
                        metavar=("PROMPTS", "INPUT", "OUTPUT"))
    parser.add_argument("--threshold", type=int, default=1024, help="kt-gpu-prefill-token-threshold")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    scn = load_scenario(args.scenario)
    workload = (args.workload[0], args.workload[1], args.workload[2])
    print(format_rows(scn, workload, args.threshold, placement_gains(scn, workload, threshold=args.threshold)))
    return 0
