"""Where the routed tokens go: per-layer expert popularity, which experts each placement
strategy puts on the GPU, and the expert-distribution dump that `frequency` reads.

Popularity (an assumption, see docs/simulator.md): in every MoE layer the share of routed
tokens of the expert of popularity rank r is Zipf, q_r ∝ (r + 1)^-s with s = `expert_zipf_s`,
over a per-layer permutation of the expert ids (the hot experts differ from layer to layer).
s = 0 is uniform routing, and then the step-time model keeps its uniform formula unchanged.

A placement is summarised as `Routing`: per popularity rank, the share of MoE layers in which
that rank's expert is on the CPU. Averaging over layers is exact for the CPU time summed over
layers (it is linear in the CPU experts hit); the per-layer max(CPU, GPU) is taken on the mean.

Dynamic expert update re-picks the GPU experts of a layer from the batch of each layerwise
prefill. What it gains over a fixed placement is locality: a share `routing_locality` of the
tokens that follow go to experts that were hot in that batch, with a popularity sharper than
the average (`expert_local_zipf_s`); the update puts the batch's top experts on the GPU.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The real recorder writes `torch.save(dict(rank, logical_count, ...))`; the simulator has no
#: torch and writes the same keys as JSON into a file with the real name and suffix.
DUMP_PREFIX = "expert_distribution_recorder_"
FALLBACK_WARNING = ("Using frequency-based strategy WITHOUT activation frequency data "
                    "(uniform distribution fallback)")


@lru_cache(maxsize=64)
def zipf(experts: int, s: float) -> tuple[float, ...]:
    """Share of routed tokens per popularity rank, descending, summing to 1."""
    weights = [(r + 1) ** -s for r in range(experts)]
    total = sum(weights)
    return tuple(w / total for w in weights)


@lru_cache(maxsize=4096)
def layer_ranking(scenario: str, layer: int, experts: int) -> tuple[int, ...]:
    """Expert ids of one layer from the most to the least popular (fixed per scenario)."""
    ids = list(range(experts))
    random.Random(f"popularity/{scenario}/{layer}").shuffle(ids)
    return tuple(ids)


@dataclass(frozen=True)
class Component:
    """Tokens routed with popularity `q` (per rank) of which `weight` is a share; `cpu[r]` is
    the share of layers whose rank-r expert is on the CPU."""

    weight: float
    q: tuple[float, ...]
    cpu: tuple[float, ...]


@dataclass(frozen=True)
class Routing:
    """How routed tokens split between CPU and GPU experts under one placement."""

    components: tuple[Component, ...]
    top_k: int

    def cpu_token_share(self) -> float:
        """Share of routed tokens computed by CPU experts."""
        return sum(c.weight * sum(w * q for w, q in zip(c.cpu, c.q, strict=True)) for c in self.components)

    def distinct(self, x: float, *, on_cpu: bool) -> float:
        """Expected distinct CPU (or GPU) experts one layer reads for x tokens."""
        total = 0.0
        for c in self.components:
            part = 0.0
            for w, q in zip(c.cpu, c.q, strict=True):
                share = w if on_cpu else 1.0 - w
                if share > 0:
                    part += share * (1.0 - (1.0 - min(1.0, self.top_k * q)) ** x)
            total += c.weight * part
        return total


def flat(experts: int, gpu_experts: float) -> tuple[float, ...]:
    """Every rank equally likely on the CPU: uniform, random and front-loading placement (the
    last puts whole layers on the GPU, the same share on average)."""
    return (max(0.0, (experts - gpu_experts) / experts),) * experts


def top(experts: int, gpu_experts: float) -> tuple[float, ...]:
    """The gpu_experts most popular ranks on the GPU (a fractional count splits one rank)."""
    return tuple(min(1.0, max(0.0, r + 1 - gpu_experts)) for r in range(experts))


def from_counts(counts: list[list[float]], moe_layers: list[int], scenario: str, experts: int,
                gpu_experts: float) -> tuple[float, ...]:
    """CPU share per rank when the GPU holds the most counted (layer, expert) pairs over all
    MoE layers, as many as `gpu_experts` per layer in total (sglang-kt's frequency masks pick
    the global top, so a layer may get more or fewer than its share)."""
    budget = int(round(gpu_experts * len(moe_layers)))
    pairs = sorted(((counts[layer][e], layer, e) for layer in moe_layers for e in range(experts)),
                   key=lambda t: (-t[0], t[1], t[2]))
    chosen = {(layer, e) for _, layer, e in pairs[:budget]}
    cpu = [0.0] * experts
    for layer in moe_layers:
        for rank, e in enumerate(layer_ranking(scenario, layer, experts)):
            if (layer, e) not in chosen:
                cpu[rank] += 1.0 / len(moe_layers)
    return tuple(cpu)


def recorded_counts(scenario: str, layers_total: int, moe_layers: list[int], experts: int, s: float,
                    routed_tokens: float, seed: int) -> list[list[float]]:
    """Per-layer expert counts the recorder would see for `routed_tokens` token-expert routings
    per layer (Poisson-like noise around the expected counts)."""
    rng = random.Random(f"recorder/{seed}")
    q = zipf(experts, s)
    counts = [[0.0] * experts for _ in range(layers_total)]
    for layer in moe_layers:
        for rank, e in enumerate(layer_ranking(scenario, layer, experts)):
            mean = routed_tokens * q[rank]
            counts[layer][e] = max(0.0, round(rng.gauss(mean, mean ** 0.5))) if mean > 0 else 0.0
    return counts


def write_dump(directory: Path, counts: list[list[float]], stamp: float) -> Path:
    """The recorder's dump file: `logical_count` shaped [buffer (1), layers, experts]."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{DUMP_PREFIX}{stamp}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"rank": 0, "logical_count": [counts], "average_utilization_rate_over_window": None}))
    tmp.replace(path)
    return path


class DumpError(ValueError):
    """An --init-expert-location file the server cannot use (its words)."""


def read_dump(path: str, layers_total: int, experts: int) -> list[list[float]]:
    """Counts summed over the buffer, checked the way sglang-kt checks them."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise DumpError(f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'") from exc
    except (OSError, ValueError) as exc:
        raise DumpError(f"_pickle.UnpicklingError: invalid load key in {path}") from exc
    if not isinstance(data, dict) or "logical_count" not in data:
        keys = list(data) if isinstance(data, dict) else []
        raise DumpError(f"ValueError: Loaded dict does not contain 'logical_count' key. Available keys: {keys}")
    buffer = data["logical_count"]
    if not (isinstance(buffer, list) and buffer and isinstance(buffer[0], list) and buffer[0]
            and isinstance(buffer[0][0], list)):
        raise DumpError("ValueError: Expected activation counts tensor with 3 dims [buffer_size, num_layers, "
                        "num_experts]")
    if len(buffer[0]) != layers_total:
        raise DumpError(f"ValueError: Activation counts num_layers ({len(buffer[0])}) doesn't match model "
                        f"num_layers ({layers_total})")
    if len(buffer[0][0]) != experts:
        raise DumpError(f"ValueError: Activation counts num_experts ({len(buffer[0][0])}) doesn't match model "
                        f"num_experts ({experts})")
    return [[float(sum(step[layer][e] for step in buffer)) for e in range(experts)] for layer in range(layers_total)]
