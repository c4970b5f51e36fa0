"""A real study, trial by trial: the flags, the outcome, the throughput, GPU memory as kttune's
model predicted it before any launch and as the real server reported it, and the time of each
phase. Prints a Markdown table (docs/real-server.md holds one); not a test.

    python benchmarks/real_study.py --space search_spaces/realbox-qwen3moe.yaml [--study NAME]
        [--storage URL] [--studies-dir studies] [--hardware machine.json]

The prediction is the memory model alone (`FeasibilityGate.for_space`, no launch observed), on
the hardware this command finds, or the JSON that `--save-hardware` wrote where the study ran.
The report comes from each trial's server.log (`tuner.server.logscan`). Sizes are decimal GB;
the servers print GiB, converted here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuner.config import load_space  # noqa: E402
from tuner.feasibility import FeasibilityGate  # noqa: E402
from tuner.machine.hardware import Hardware, resolve_hardware  # noqa: E402
from tuner.server import logscan  # noqa: E402
from tuner.storage import attrs  # noqa: E402

GB_PER_GIB = 2**30 / 1e9
SHORT = {"kt-num-gpu-experts": "gpu-exp", "kt-cpuinfer": "cpuinfer", "kt-threadpool-count": "pools",
         "chunked-prefill-size": "chunk", "max-running-requests": "max-run", "mem-fraction-static": "mfs"}


def hardware_block(hw: Hardware) -> dict[str, Any]:
    """`hw` as a space's ``hardware:`` block, free GPU memory included, so that the model can
    be asked again elsewhere about the machine the study ran on."""
    g, c = hw.gpus[0], hw.cpu
    return {"gpu": {"count": len(hw.gpus), "name": g.name, "memory_mib": g.total_bytes // 2**20,
                    "free_mib": min(x.free_bytes for x in hw.gpus) // 2**20},
            "cpu": {"model": c.model, "sockets": c.sockets, "physical_cores": c.physical_cores,
                    "logical_cores": c.logical_cores, "numa_nodes": c.numa_nodes, "amx": c.amx, "avx512": c.avx512},
            "ram_gib": hw.ram_bytes // 2**30, "ram_available_gib": hw.ram_available_bytes // 2**30}


def gb(gib: float | None) -> str:
    return "–" if gib is None else f"{gib * GB_PER_GIB:.2f}"


def outcome(t: optuna.trial.FrozenTrial) -> str:
    reason = t.user_attrs.get(attrs.ATTR_REASON)
    if t.state == optuna.trial.TrialState.PRUNED:
        return "pruned"
    if reason:
        return str(reason)
    return "measured" if t.state == optuna.trial.TrialState.COMPLETE else t.state.name.lower()


def reported(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    trial_dir = t.user_attrs.get(attrs.ATTR_TRIAL_DIR)
    log = Path(str(trial_dir)) / "server.log" if trial_dir else None
    if log is None or not log.exists():
        return {}
    return logscan.parse_memory_lines(log.read_text(errors="replace"))


def rows(study: optuna.Study, gate: FeasibilityGate, objective: str) -> list[list[str]]:
    out = []
    for t in study.trials:
        flags = t.user_attrs.get(attrs.ATTR_FLAGS) or {}
        if not t.user_attrs.get(attrs.ATTR_LAUNCHED):
            continue
        tuned = " ".join(f"{SHORT.get(k, k)}={v}" for k, v in t.params.items())
        pred = gate.check(flags) if flags else None
        rep = reported(t)
        tm = attrs.timings_of(t)
        value = attrs.metrics_of(t).get(objective)
        b = pred.breakdown_gb if pred else {}
        out.append([str(t.number), tuned, outcome(t), "–" if value is None else f"{value:.0f}",
                    f"{b.get('weights_nonexpert', 0) + b.get('gpu_experts', 0) + b.get('staging', 0):.2f}" if pred else "–",
                    gb(rep.get("weight_mem_gib")),
                    f"{pred.kv_capacity_tokens}" if pred else "–", str(rep.get("kv_tokens", "–")),
                    f"{b.get('cuda_graphs', 0):.2f}" if pred else "–", gb(rep.get("cuda_graph_mem_gib")),
                    f"{b.get('free', 0):.2f}" if pred else "–", gb(rep.get("weight_begin_avail_gib")),
                    ("fits" if pred.feasible else "no") if pred else "–",
                    " / ".join(f"{tm[k]:.0f}" if k in tm else "–" for k in ("ready_s", "teardown_s")),
                    " / ".join(f"{v:.0f}" for k, v in tm.items() if k.startswith("bench_")) or "–",
                    f"{attrs.wall_s_of(t):.0f}" if attrs.wall_s_of(t) else "–"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, required=True)
    ap.add_argument("--study")
    ap.add_argument("--storage")
    ap.add_argument("--hardware", type=Path, help="hardware JSON written by --save-hardware where the study ran")
    ap.add_argument("--save-hardware", type=Path, help="write this machine's hardware (the space's hardware: form) and stop")
    a = ap.parse_args()
    space = load_space(a.space, check_paths=False)
    if a.save_hardware:
        a.save_hardware.write_text(json.dumps(hardware_block(resolve_hardware(space.hardware or None)), indent=1))
        return
    if a.hardware:
        space = type(space)(**{**space.__dict__, "hardware": json.loads(a.hardware.read_text())})
    name = a.study or space.name
    storage = a.storage or f"sqlite:///studies/{name}.db"
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SystemExit(f"real_study: no study {name!r} in {storage}; pass --study or --storage") from None
    gate = FeasibilityGate.for_space(space)
    objective = f"{space.objectives[0].workload}.{space.objectives[0].metric}"
    header = ["trial", "tuned flags", "outcome", objective, "weights GB pred", "weights GB real", "KV tokens pred",
              "KV tokens real", "graphs GB pred", "graphs GB real", "free GB pred", "free GB real", "plan",
              "ready / teardown s", "bench s", "wall s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows(study, gate, objective):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
