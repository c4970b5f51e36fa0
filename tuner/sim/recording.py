"""The simulated expert-distribution recorder: the counts a recording server would have seen
for a number of routed tokens, written as the recorder's dump file."""
from __future__ import annotations

import time
from pathlib import Path

from tuner.sim.perfmodel.placement import recorded_counts, write_dump
from tuner.sim.scenario import Scenario


def record_dump(scn: Scenario, tokens: float, directory: Path, *, seed: int, stamp: float | None = None) -> Path:
    """Dump the counts of `tokens` tokens (each routed to top-k experts in every MoE layer)."""
    model = scn.model
    moe_layers = list(range(model.layers_total - model.layers_moe, model.layers_total))
    counts = recorded_counts(scn.name, model.layers_total, moe_layers, model.experts, scn.c("expert_zipf_s"),
                             tokens * model.top_k, seed)
    return write_dump(directory, counts, time.time() if stamp is None else stamp)
