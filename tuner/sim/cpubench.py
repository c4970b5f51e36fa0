"""The simulator's stand-in for kt-kernel in `kttune cpubench`: the CPU-expert time of one MoE
layer of the scenario's model on the scenario's CPU, from the same model the simulated server
runs (`StepModel.cpu_decode_s` / `cpu_prefill_s`), printed as the kt-kernel worker prints it.

It is a test double, not a measurement: it lets a simulated space go through the same sweep,
prescreen and search as a real one. Like the real sweep it runs the CPU experts alone: the GPU
ranks' own CPU threads, which the server's model charges to threads beyond the free cores, are
not running (``tp = 0`` for the capability). Each repeat's mean carries a log-normal error of
the space's ``sim-noise``, so the prescreen meets noise as it does on a machine.

    python -m tuner.sim.cpubench point '{"scenario": "kimi-k2-thinking-8xl20", "threads": 56, ...}'
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from collections.abc import Mapping
from typing import Any

from tuner.cpubench import WORKER_TAG
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.perfmodel.steptime import StepModel
from tuner.sim.scenario import load_scenario


def layer_seconds(spec: Mapping[str, Any], batch: int) -> float:
    """Noise-free seconds of one layer's CPU experts at `batch` tokens, every expert on the CPU."""
    scn = load_scenario(str(spec["scenario"]))
    cfg = SimConfig(tp=1, kt_weight_path="sim", kt_num_gpu_experts=0, kt_cpuinfer=int(spec["threads"]),
                    kt_threadpool_count=int(spec["pools"]), kt_method=str(spec.get("method", "AMXINT4")),
                    chunked_prefill_size=max(int(b) for b in spec["batches"]))
    rc = dataclasses.replace(cfg.resolved(scn), tp=0)   # alone: no GPU rank holds a core
    model = StepModel.build(scn, rc)
    return model.cpu_prefill_s(batch) if batch == spec.get("prefill") else model.cpu_decode_s(batch)


def point(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The worker's tagged lines for one (threads, pools) point."""
    rng = random.Random(f"{spec.get('scenario')}/{spec['threads']}/{spec['pools']}/{spec.get('seed', 0)}")
    sigma = float(spec.get("noise", 0.025))
    lines: list[dict[str, Any]] = [{"kind": "setup", "class": "simulated", "setup_s": 0.0}]
    for batch in spec["batches"]:
        base = layer_seconds(spec, int(batch))
        lines.append({"kind": "batch", "batch": int(batch),
                      "seconds": [base * math.exp(rng.gauss(0.0, sigma)) for _ in range(int(spec.get("repeats", 3)))]})
    return lines


def main(argv: list[str]) -> int:
    mode, spec = (argv[0] if argv else ""), (json.loads(argv[1]) if len(argv) > 1 else {})
    info = {"kt_kernel": "simulated", "variant": f"scenario {spec.get('scenario')}", "python": sys.version.split()[0],
            "cores": None}
    if mode == "probe":
        print(WORKER_TAG + json.dumps({**info, "method": spec.get("method"), "class": "simulated"}), flush=True)
        return 0
    if mode != "point":
        print(WORKER_TAG + json.dumps({"error": f"the simulator has no {mode!r} mode", "kind": "point"}), flush=True)
        return 3
    for line in point(spec):
        print(WORKER_TAG + json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
