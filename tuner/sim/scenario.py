"""Hardware + model scenarios for the simulated server, loaded from YAML.

A scenario states the hardware and model facts the analytical model needs explicitly; model
constants default to DEFAULT_CONSTANTS and may be overridden per scenario.
Memory sizes of the GPU are GiB (what SGLang prints as "GB"); weight sizes are decimal bytes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from tuner.errors import ConfigError

SCENARIO_DIR = Path(__file__).parent / "scenarios"

#: Model constants, tagged [F] fitted to the seed deployment, [A] assumed, [S] taken from a source
#: (SGLang, KTransformers); a scenario's `constants:` block may override any of them.
DEFAULT_CONSTANTS: Mapping[str, float] = MappingProxyType({
    "eta_bw": 0.29,              # share of theoretical DRAM bandwidth KT reaches [F]
    "tau": 6.0,                  # threads per node to saturate a node's bandwidth [A]
    "pi_core_tops": 0.357,       # AMX-INT4 TOPS per worker thread [F]
    "m_half": 38.0,              # tokens/expert for half AMX efficiency [A/F]
    "e_avx": 0.15,               # AVX-512 path efficiency below the AMX threshold [A]
    "bf16_compute_factor": 0.5,  # CPU throughput of BF16/FP8 kernels relative to INT4/INT8 [A]
    "routing_skew": 1.0,         # sigma in E_eff = sigma*E for U(x) [A]
    # Expert popularity (perfmodel/placement.py); 0 = uniform routing, the model above unchanged.
    "expert_zipf_s": 0.0,        # Zipf exponent of a layer's expert popularity [A, calibrated to published gains]
    "expert_local_zipf_s": 1.3,  # ... of the experts hot in one batch (routing locality) [A, calibrated]
    "routing_locality": 0.27,    # share of routed tokens that follow the last batch's hot experts [A, calibrated]
    "dyn_update_ms": 0.2,        # per layer and update: counting and re-picking the GPU experts [A]
    "t0_ms": 0.3,                # CPU MoE submit/sync overhead per layer [A]
    "t_fix_ms": 0.4,             # GPU per-layer fixed time at TP>1 (all-reduce over PCIe) [A/F]
    "t_fix_tp1_ms": 0.15,        # same at TP1 [A]
    "no_graph_ms": 0.3,          # extra per-layer launch cost of a decode batch not in a CUDA graph [A]
    "t_step0_ms": 20.0,          # per decode step (scheduler, sampling, lm_head) [A]
    "t_chunk0_s": 0.1,           # per prefill forward [A]
    "eta_g": 0.7,                # GPU memory-bandwidth efficiency [A]
    "eta_attn": 0.45,            # GPU tensor efficiency of the non-expert part of a layer [A]
    "t_ar0_us": 50.0,            # all-reduce latency [A]
    "ar_eff": 0.8,               # all-reduce bandwidth efficiency [A]
    "act_rep_bytes": 16.0,       # activation bytes per chunk token per hidden unit, replicated [A]
    "act_shard_bytes": 50.0,     # ... and TP-sharded (alpha = H*(rep + shard/TP); Kimi TP8 0.16 MB)
    "ctx_mem_gib": 0.5,          # CUDA context [A]
    "graph_base_gib": 0.35,      # graph pool, cuBLAS workspace [A]
    "nccl_gib": 0.25,            # NCCL buffers when TP>1 [A]
    "graph_bytes_per_bs": 30.0,  # graph memory per captured batch per hidden unit per layer [A]
    "contention_slope": 0.04,    # per thread over free cores [A]
    "oversub_slope": 1.5,        # per fraction of a node's cores over T/P [A]
    "defer_cap": 1.45,           # max decode gain from deferral [S]
    "oom_band_gib": 0.4,         # fuzzy OOM band half-width [A]
    "slow_run_prob": 0.05,       # chance of a 5-15 % slower run [A]
    "kv_new_token_ratio": 0.7,   # admission reserves in + ratio*out [S: SGLang init ratio]
    "mla_profile_quirk": 1.0,    # 1: sglang-kt sizes the MLA KV pool with a (nope+rope) cell per token
    "load_base_s": 30.0,         # startup time base [A]
    "load_gbs": 2.0,             # CPU weight load rate, GB/s [A]
})


@dataclass(frozen=True)
class GpuSpec:
    name: str
    count: int
    visible_memory_gib: float
    bandwidth_gbs: float
    tflops: float                 # dense BF16/FP16 tensor TFLOP/s
    pcie_gbs: float               # practical host<->device GB/s per direction
    reserved_by_others_gib: float = 0.0


@dataclass(frozen=True)
class CpuSpec:
    name: str
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    numa_nodes: int
    channels_per_socket: int
    memory_mts: float
    amx: bool
    ram_gib: float

    @property
    def physical_cores(self) -> int:
        return self.sockets * self.cores_per_socket

    @property
    def cores_per_node(self) -> float:
        return self.physical_cores / self.numa_nodes

    @property
    def peak_bw_gbs(self) -> float:
        """beta_peak = s * channels * MT/s * 8 B."""
        return self.sockets * self.channels_per_socket * self.memory_mts * 8 / 1000.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers_total: int
    layers_moe: int
    experts: int
    top_k: int
    shared_experts: int
    hidden: int
    moe_intermediate: int
    attention: str                # "mla" or "gqa"
    num_heads: int
    num_kv_heads: int             # gqa only (mla: 1)
    head_dim: int                 # gqa head dim; mla: qk_nope + rope
    v_head_dim: int
    kv_lora_rank: int             # mla only
    qk_rope_dim: int              # mla only
    qk_nope_dim: int              # mla only
    context_len: int
    vocab: int
    gpu_weight_format: str
    gpu_bytes_per_expert: float
    nonexpert_weight_gb_tp1: float
    nonexpert_replicated_gb: float
    nonexpert_params_b: float
    cpu_bytes_per_expert: Mapping[str, float]

    @property
    def params_per_expert(self) -> float:
        return 3.0 * self.hidden * self.moe_intermediate

    @property
    def amx_threshold(self) -> float:
        """AMX kernels run only when qlen > 4E/k (kt-kernel operators/amx/moe.hpp)."""
        return 4.0 * self.experts / self.top_k

    def kv_bytes_per_token(self, tp: int) -> float:
        """KV cache bytes per token per GPU (BF16). MLA is replicated on every rank."""
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_dim) * self.layers_total * 2.0
        heads = max(1, self.num_kv_heads // tp)
        return 2.0 * heads * self.head_dim * self.layers_total * 2.0

    def kv_profile_bytes_per_token(self, tp: int, quirk: bool) -> float:
        """Bytes per token the sglang-kt profiler divides the free memory by: with the quirk, MLA
        counts a (nope + rope) cell although the pool stores (kv_lora + rope)."""
        if self.attention == "mla" and quirk:
            return (self.qk_nope_dim + self.qk_rope_dim) * self.layers_total * 2.0
        return self.kv_bytes_per_token(tp)

    def nonexpert_gb(self, tp: int) -> float:
        """Non-expert weight GB per GPU: replicated part + sharded part / TP."""
        shard = self.nonexpert_weight_gb_tp1 - self.nonexpert_replicated_gb
        return self.nonexpert_replicated_gb + shard / tp

    def layer_params_per_gpu(self, tp: int) -> float:
        """Non-expert, non-embedding parameters of one layer on one GPU (drives a1)."""
        embed = 2.0 * self.vocab * self.hidden
        return max(0.0, self.nonexpert_params_b * 1e9 - embed) / self.layers_total / tp


@dataclass(frozen=True)
class Scenario:
    name: str
    gpu: GpuSpec
    cpu: CpuSpec
    model: ModelSpec
    constants: Mapping[str, float]
    description: str = ""

    def c(self, key: str) -> float:
        """A model constant (scenario override or DEFAULT_CONSTANTS)."""
        return float(self.constants[key])


_MODEL_OPTIONAL = {"shared_experts": 0, "num_kv_heads": 1, "head_dim": 0, "v_head_dim": 0,
                   "kv_lora_rank": 0, "qk_rope_dim": 0, "qk_nope_dim": 0,
                   "nonexpert_replicated_gb": 0.0}
_GPU_OPTIONAL = {"reserved_by_others_gib": 0.0}


def _num(value: Any) -> float | None:
    """A YAML number; also accepts '24.77e6', which YAML 1.1 leaves as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build(cls: type, raw: Any, section: str, optional: Mapping[str, Any]) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"scenario field '{section}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"scenario field '{section}.{unknown[0]}' is not a known field")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            if name in optional:
                kwargs[name] = optional[name]
                continue
            raise ConfigError(f"scenario field '{section}.{name}' is required")
        value = raw[name]
        kind = str(f.type)
        if kind == "str":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"scenario field '{section}.{name}' must be a non-empty string")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"scenario field '{section}.{name}' must be true/false, got {value!r}")
        elif kind in ("int", "float"):
            num = _num(value)
            if num is None:
                raise ConfigError(f"scenario field '{section}.{name}' must be a number, got {value!r}")
            value = num
            if kind == "int" and int(value) != value:
                raise ConfigError(f"scenario field '{section}.{name}' must be an integer, got {value!r}")
            if value < 0 or (value == 0 and name not in optional):
                raise ConfigError(f"scenario field '{section}.{name}' must be > 0, got {value!r}")
            value = int(value) if kind == "int" else float(value)
        kwargs[name] = value
    return cls(**kwargs)


def _model(raw: Any) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError("scenario field 'model' must be a mapping")
    cpu_bytes = raw.get("cpu_bytes_per_expert")
    if not isinstance(cpu_bytes, Mapping) or not cpu_bytes:
        raise ConfigError("scenario field 'model.cpu_bytes_per_expert' must map kt-method -> bytes")
    for key, value in cpu_bytes.items():
        num = _num(value)
        if num is None or num <= 0:
            raise ConfigError(f"scenario field 'model.cpu_bytes_per_expert.{key}' must be > 0, got {value!r}")
    data = dict(raw)
    data["cpu_bytes_per_expert"] = MappingProxyType({str(k).upper(): float(_num(v) or 0) for k, v in cpu_bytes.items()})
    spec: ModelSpec = _build(ModelSpec, data, "model", _MODEL_OPTIONAL)
    if spec.attention not in ("mla", "gqa"):
        raise ConfigError(f"scenario field 'model.attention' must be 'mla' or 'gqa', got {spec.attention!r}")
    if spec.layers_moe > spec.layers_total:
        raise ConfigError(f"scenario field 'model.layers_moe' must be <= layers_total ({spec.layers_total}),"
                          f" got {spec.layers_moe}")
    if spec.top_k > spec.experts:
        raise ConfigError(f"scenario field 'model.top_k' must be <= experts, got {spec.top_k}")
    if spec.attention == "mla" and not (spec.kv_lora_rank and spec.qk_rope_dim and spec.qk_nope_dim):
        raise ConfigError("scenario field 'model.kv_lora_rank/qk_rope_dim/qk_nope_dim' required for mla")
    if spec.attention == "gqa" and not spec.head_dim:
        raise ConfigError("scenario field 'model.head_dim' is required for gqa")
    return spec


def _constants(raw: Any) -> Mapping[str, float]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("scenario field 'constants' must be a mapping")
    merged = dict(DEFAULT_CONSTANTS)
    for key, value in raw.items():
        if key not in DEFAULT_CONSTANTS:
            raise ConfigError(f"scenario field 'constants.{key}' is not a known constant")
        num = _num(value)
        if num is None or num < 0:
            raise ConfigError(f"scenario field 'constants.{key}' must be a number >= 0, got {value!r}")
        merged[key] = float(num)
    return MappingProxyType(merged)


def scenario_from_dict(data: Mapping[str, Any], *, default_name: str = "") -> Scenario:
    """Build and validate a Scenario from a parsed YAML mapping."""
    if not isinstance(data, Mapping):
        raise ConfigError("a scenario file must hold a mapping at its root")
    unknown = sorted(set(data) - {"name", "description", "gpu", "cpu", "model", "constants", "base"})
    if unknown:
        raise ConfigError(f"scenario field '{unknown[0]}' is not a known field")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError("scenario field 'name' must be a non-empty string")
    cpu = _build(CpuSpec, data.get("cpu"), "cpu", {})
    if cpu.numa_nodes > cpu.physical_cores:
        raise ConfigError(f"scenario field 'cpu.numa_nodes' must be <= cores, got {cpu.numa_nodes}")
    return Scenario(name=name, gpu=_build(GpuSpec, data.get("gpu"), "gpu", _GPU_OPTIONAL), cpu=cpu,
                    model=_model(data.get("model")), constants=_constants(data.get("constants")),
                    description=str(data.get("description", "")))


def list_scenarios() -> list[str]:
    """Names (file stems) of the scenarios shipped in tuner/sim/scenarios/."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    """Load a shipped scenario by name, or any scenario YAML by path."""
    path, data = _scenario_data(name_or_path)
    return scenario_from_dict(data, default_name=path.stem)


def _scenario_data(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The scenario's YAML mapping; with ``base: <shipped scenario>`` it is that scenario's,
    section by section overridden by what this file gives (a what-if states only what differs)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"scenario must be one of {list_scenarios()} or a YAML path,"
                              f" got {name_or_path!r}")
    if not path.is_file():
        raise ConfigError(f"scenario file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "base" not in data:
        return path, data
    base = data.pop("base")
    if not isinstance(base, str) or base in seen + (path.stem,):
        raise ConfigError(f"scenario field 'base' must name another scenario (shipped name or YAML path), got {base!r}")
    _, merged = _scenario_data(base, seen + (path.stem,))
    for key, value in data.items():
        both = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = {**merged[key], **value} if both else value
    return path, merged
