"""Model sizes from a Hugging Face ``config.json``: layers, experts, attention and the bytes
that weights and KV cache take per GPU and in host RAM.

Sizes are bytes; "GB" elsewhere in kttune means 1e9 bytes. Formats follow what SGLang keeps in
memory: the GPU copy of an expert uses the *checkpoint* format (``quantization_config``), the
CPU copy uses ``--kt-method``. Parallel layout follows SGLang's DeepSeek/Qwen MoE models:
vocab-parallel embeddings and lm_head, column/row-parallel attention and MLPs, replicated MLA
down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``), router gates and norms, and KV heads
replicated once TP exceeds their count.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError

#: ``--kt-method`` values with a known CPU weight layout.
KT_METHODS = ("AMXINT4", "AMXINT8", "BF16", "FP8", "RAWINT4", "GPTQ_INT4", "MXFP4", "LLAMAFILE")
#: Override keys that are not config.json fields.
SPECIAL_OVERRIDES = ("name", "expert_format", "nonexpert_format", "cpu_group_size", "mla_absorb_copy")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class WeightFormat:
    """Bytes of a quantised n×k weight: packed values plus group, block or row scales."""

    name: str
    bits: int
    group_size: int = 0  # one scale per `group_size` inputs of a row
    block: int = 0  # one scale per block×block tile
    scale_bytes: float = 0.0
    row_scale_bytes: float = 0.0  # one scale per output row
    zero_bits: int = 0  # asymmetric quantisation: one zero point per group

    def matrix_bytes(self, n: int, k: int) -> int:
        size = n * k * self.bits / 8 + n * self.row_scale_bytes
        if self.group_size:
            groups = n * math.ceil(k / self.group_size)
            size += groups * (self.scale_bytes + self.zero_bits / 8)
        if self.block:
            size += math.ceil(n / self.block) * math.ceil(k / self.block) * self.scale_bytes
        return int(math.ceil(size))


def parse_format(text: str) -> WeightFormat:
    """``bf16``, ``fp16``, ``fp32``, ``fp8`` (row scales), ``fp8_block128``, ``int4_g32``
    (bf16 group scales; ``int4_g128_asym`` adds zero points), ``mxfp4``, ``nvfp4``."""
    t = text.strip().lower()
    fixed = {"bf16": WeightFormat("bf16", 16), "fp16": WeightFormat("fp16", 16), "fp32": WeightFormat("fp32", 32),
             "fp8": WeightFormat("fp8", 8, row_scale_bytes=4),
             "mxfp4": WeightFormat("mxfp4", 4, group_size=32, scale_bytes=1),
             "nvfp4": WeightFormat("nvfp4", 4, group_size=16, scale_bytes=1)}
    if t in fixed:
        return fixed[t]
    if m := re.fullmatch(r"fp8_block(\d+)", t):
        return WeightFormat(t, 8, block=int(m[1]), scale_bytes=4)
    if m := re.fullmatch(r"int(\d+)_g(\d+)(_asym)?", t):
        bits = int(m[1])
        return WeightFormat(t, bits, group_size=int(m[2]), scale_bytes=2, zero_bits=bits if m[3] else 0)
    raise ConfigError(f"model.expert_format/nonexpert_format must be one of bf16, fp16, fp32, fp8, fp8_block<B>, "
                      f"int<b>_g<G>[_asym], mxfp4, nvfp4; got {text!r}")


@dataclass(frozen=True)
class WeightPart:
    """A group of non-expert weights and how TP splits it: ``tp`` (sharded), ``replicated``,
    or ``kv_heads`` (sharded by KV head, replicated once TP exceeds the KV head count)."""

    name: str
    bytes: int
    sharding: str


@dataclass(frozen=True)
class ModelSizes:
    name: str
    source: str
    architecture: str
    model_type: str
    num_layers: int
    num_dense_layers: int
    num_moe_layers: int
    n_routed_experts: int
    top_k: int
    n_shared_experts: int
    hidden_size: int
    moe_intermediate_size: int
    dense_intermediate_size: int
    shared_intermediate_size: int  # total shared-expert width per MoE layer
    vocab_size: int
    tie_word_embeddings: bool
    attention: str  # "mla" or "gqa"
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_layers: int
    max_position_embeddings: int
    dtype_bytes: int
    expert_format: WeightFormat
    nonexpert_format: WeightFormat
    cpu_group_size: int
    nonexpert_parts: tuple[WeightPart, ...]

    # --- experts -------------------------------------------------------------------------
    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def _expert_bytes(self, fmt: WeightFormat) -> int:
        h, i = self.hidden_size, self.moe_intermediate_size
        return 2 * fmt.matrix_bytes(i, h) + fmt.matrix_bytes(h, i)  # gate, up: I×H; down: H×I

    @property
    def gpu_bytes_per_expert(self) -> int:
        return self._expert_bytes(self.expert_format)

    def cpu_bytes_per_expert(self, method: str) -> int:
        """Host bytes of one expert in the ``--kt-method`` layout (kt-kernel buffers)."""
        m = method.upper()
        h, i = self.hidden_size, self.moe_intermediate_size
        per_matrix = {
            "AMXINT4": lambda n, k: n * k // 2 + 4 * n,
            "AMXINT8": lambda n, k: n * k + 4 * n,
            "BF16": lambda n, k: 2 * n * k,
            "FP8": lambda n, k: n * k + 4 * math.ceil(n / 128) * math.ceil(k / 128),
            "RAWINT4": lambda n, k: n * k // 2 + 4 * n * k // self.cpu_group_size,
            "GPTQ_INT4": lambda n, k: n * k // 2 + 4 * n * k // self.cpu_group_size,
            "MXFP4": lambda n, k: n * k // 2 + n * k // 32,
            "LLAMAFILE": lambda n, k: n * k * 9 // 16,  # assumes GGUF Q4_K (4.5 bits/weight)
        }.get(m)
        if per_matrix is None:
            raise ConfigError(f"kt-method must be one of {', '.join(KT_METHODS)}; got {method!r}")
        return 2 * per_matrix(i, h) + per_matrix(h, i)

    def cpu_expert_bytes_total(self, method: str) -> int:
        """Host RAM for all routed experts; KT keeps GPU-resident experts in RAM too (#2084)."""
        return self.cpu_bytes_per_expert(method) * self.n_routed_experts * self.num_moe_layers

    def gpu_expert_bytes_per_gpu(self, n_per_layer: int, tp: int) -> float:
        """N experts per MoE layer on GPU, intermediate dim TP-sharded."""
        return min(n_per_layer, self.n_routed_experts) * self.num_moe_layers * self.gpu_bytes_per_expert / tp

    def layerwise_slot_bytes(self, tp: int) -> float:
        """One whole MoE layer streamed to GPU by ``--kt-gpu-prefill-token-threshold``."""
        return self.n_routed_experts * self.gpu_bytes_per_expert / tp

    @property
    def amx_threshold_tokens(self) -> int:
        """Chunk tokens above which kt-kernel uses AMX rather than AVX-512 (qlen > 4E/k)."""
        return 4 * self.n_routed_experts // max(self.top_k, 1)

    # --- non-expert weights --------------------------------------------------------------
    def nonexpert_bytes_per_gpu(self, tp: int) -> float:
        total = 0.0
        for part in self.nonexpert_parts:
            if part.sharding == "replicated":
                total += part.bytes
            elif part.sharding == "kv_heads":
                total += part.bytes * max(1, self.num_kv_heads // tp) / self.num_kv_heads
            else:
                total += part.bytes / tp
        return total

    @property
    def nonexpert_bytes_total(self) -> int:
        return sum(p.bytes for p in self.nonexpert_parts)

    # --- KV cache -------------------------------------------------------------------------
    def kv_bytes_per_token(self, tp: int, kv_dtype_bytes: int | None = None) -> int:
        """KV cache bytes per token on each GPU. MLA: one latent (kv_lora + rope) per layer,
        replicated on every rank. GQA: K and V for this rank's KV heads."""
        b = kv_dtype_bytes or self.dtype_bytes
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_layers * b
        return 2 * max(1, self.num_kv_heads // tp) * self.head_dim * self.kv_layers * b

    def sglang_kt_profile_cell(self, tp: int, kv_dtype_bytes: int | None = None) -> int:
        """Per-token cell sglang-kt 0.7.2's KV profiler divides by: for non-GLM MLA
        models (qk_nope + rope)·layers·bytes, a third of the real 576-wide cell."""
        if self.attention == "mla" and not self.model_type.startswith("glm"):
            b = kv_dtype_bytes or self.dtype_bytes
            return (self.qk_nope_head_dim + self.qk_rope_head_dim) * self.kv_layers * b
        return self.kv_bytes_per_token(tp, kv_dtype_bytes)


# --- loading ---------------------------------------------------------------------------------
class _Cfg:
    """The merged config dict with field lookups that fail with a helpful ConfigError."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data, self.source = data, source

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if self.data.get(key) is not None:
                return self.data[key]
        return default

    def need(self, *keys: str, why: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise ConfigError(
                f"{self.source}: missing field {keys[0]!r} (needed for {why}); add it under `model:` overrides "
                f"in the search space, e.g. model: {{{keys[0]}: <value>}}")
        return value

    def int(self, *keys: str, why: str, default: int | None = None) -> int:
        value: Any = self.get(*keys) if default is not None else self.need(*keys, why=why)
        value = default if value is None else value
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.source}: field {keys[0]!r} must be an integer; got {value!r}") from None


def _read_config(model_path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(model_path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model config not found: {file} (the model path must hold a Hugging Face config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {file} must be a JSON object")
    return data, str(file)


def _merge_text_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """Multimodal wrappers (Kimi-K2.5 style) keep the language model under ``text_config``."""
    merged = {k: v for k, v in data.items() if k != "text_config"}
    if isinstance(data.get("text_config"), Mapping):
        merged.update(data["text_config"])
        if "architectures" in data:
            merged.setdefault("architectures", data["architectures"])
    return merged


def _moe_layer_ids(cfg: _Cfg, n_layers: int, experts: int) -> list[int]:
    if experts <= 0:
        return []
    if cfg.get("first_k_dense_replace", "moe_layer_freq") is not None or cfg.get("n_routed_experts") is not None:
        first = cfg.int("first_k_dense_replace", why="dense layers", default=0)
        freq = cfg.get("moe_layer_freq", default=1)
        if isinstance(freq, list):  # per-layer flags
            return [i for i in range(n_layers) if i < len(freq) and freq[i]]
        return [i for i in range(n_layers) if i >= first and i % max(int(freq), 1) == 0]
    step = cfg.int("decoder_sparse_step", "interleave_moe_layer_step", why="MoE layer step", default=1)
    dense_only = set(cfg.get("mlp_only_layers", default=[]) or [])
    return [i for i in range(n_layers) if i not in dense_only and (i + 1) % max(step, 1) == 0]


def _checkpoint_formats(cfg: _Cfg, dtype_bytes: int) -> tuple[dict[str, WeightFormat], int]:
    """Checkpoint format per component (expert, attention, dense_mlp, shared) and the int4
    group size, from ``quantization_config``."""
    plain = WeightFormat("fp32" if dtype_bytes == 4 else "bf16", 8 * dtype_bytes)
    q = cfg.get("quantization_config", "compression_config")
    if not isinstance(q, Mapping):
        return dict.fromkeys(_NAMES, plain), 128
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        block = q.get("weight_block_size")
        fmt = parse_format(f"fp8_block{int(block[0])}") if block else parse_format("fp8")
        skip = [str(s) for s in (q.get("modules_to_not_convert") or q.get("ignored_layers") or [])]
        return {c: plain if _matches(skip, names) else fmt for c, names in _NAMES.items()}, 128
    if method == "compressed-tensors":
        ignore = [str(s) for s in q.get("ignore") or []]
        formats = dict.fromkeys(_NAMES, plain)
        gsize = 128
        for group in (q.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            bits, g = int(w.get("num_bits", 8)), int(w.get("group_size") or 0)
            if w.get("type", "int") == "float":
                fmt = parse_format(("nvfp4" if g == 16 else "mxfp4") if bits == 4 else "fp8")
            else:
                fmt = parse_format(f"int{bits}_g{g or 128}" + ("" if w.get("symmetric", True) else "_asym"))
                gsize = g or gsize
            targets = [str(t) for t in group.get("targets") or []]
            for comp, names in _NAMES.items():
                if not _matches(ignore, names) and ("Linear" in targets or _matches(targets, names)):
                    formats[comp] = fmt
        return formats, gsize
    if method in ("gptq", "awq", "auto-round"):
        bits, g = int(q.get("bits", 4)), int(q.get("group_size", 128))
        fmt = parse_format(f"int{bits}_g{g if g > 0 else 128}" + ("" if q.get("sym", False) else "_asym"))
        skip = [str(s) for s in (q.get("modules_to_not_convert") or [])]
        return {c: plain if _matches(skip, names) else fmt for c, names in _NAMES.items()}, g if g > 0 else 128
    if method == "mxfp4":
        return {**dict.fromkeys(_NAMES, plain), "expert": parse_format("mxfp4")}, 32
    raise ConfigError(f"{cfg.source}: quantization_config.quant_method {method!r} is not understood; set "
                      f"`model: {{expert_format: ..., nonexpert_format: ...}}` (e.g. int4_g32, fp8_block128, bf16)")


# Representative module names (DeepSeek and Qwen spellings) matched against ignore/target lists.
_NAMES = {
    "expert": ("model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.down_proj"),
    "attention": ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj",
                  "model.layers.1.self_attn.kv_a_proj_with_mqa"),
    "dense_mlp": ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"),
    "shared": ("model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_expert.gate_proj"),
}


def _matches(patterns: list[str], names: tuple[str, ...]) -> bool:
    """compressed-tensors rules: ``re:`` entries are regexes (re.match); others match a name
    or its dotted suffix."""
    for pat in patterns:
        for name in names:
            if pat.startswith("re:") and re.match(pat[3:], name):
                return True
            if not pat.startswith("re:") and (name == pat or name.endswith("." + pat) or ("." + pat + ".") in name):
                return True
    return False


def load_model_sizes(model_path: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelSizes:
    """Read ``config.json`` (a model directory or the file itself) and derive sizes.

    ``overrides`` (the search space's ``model:`` block) replace or add config.json fields, plus
    ``name``, ``expert_format``, ``nonexpert_format`` (see :func:`parse_format`),
    ``cpu_group_size`` (RAWINT4/GPTQ_INT4 group) and ``mla_absorb_copy`` (bool).
    """
    raw, source = _read_config(model_path)
    data = _merge_text_config(raw)
    special = {k: v for k, v in (overrides or {}).items() if k in SPECIAL_OVERRIDES}
    data.update({k: v for k, v in (overrides or {}).items() if k not in SPECIAL_OVERRIDES})
    cfg = _Cfg(data, source)

    n_layers = cfg.int("num_hidden_layers", "n_layers", "num_layers", why="layer count")
    hidden = cfg.int("hidden_size", "d_model", why="hidden size")
    vocab = cfg.int("vocab_size", why="embedding size")
    if cfg.get("n_routed_experts", "num_experts", "num_local_experts") is None and cfg.get("hidden_size") is not None:
        # KTransformers offloads routed experts; a model without them has nothing to place.
        raise ConfigError(f"{cfg.source}: no routed experts (none of n_routed_experts, num_experts, "
                          "num_local_experts): a dense model, which kt-kernel does not offload; kttune tunes MoE "
                          "models (give model: {n_routed_experts: N, ...} overrides if the config names them otherwise)")
    experts = cfg.int("n_routed_experts", "num_experts", "num_local_experts", why="routed expert count")
    top_k = cfg.int("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", why="top-k")
    moe_inter = cfg.int("moe_intermediate_size", why="expert size (3·hidden·moe_intermediate params)")
    moe_ids = _moe_layer_ids(cfg, n_layers, experts)
    n_moe, n_dense = len(moe_ids), n_layers - len(moe_ids)
    dense_inter = cfg.int("intermediate_size", why="dense MLP layers") if n_dense else int(cfg.get("intermediate_size", default=0))
    n_shared = int(cfg.get("n_shared_experts", "num_shared_experts", default=0) or 0)
    shared_inter = int(cfg.get("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", default=0) or 0)
    shared_inter = shared_inter or n_shared * moe_inter
    dtype = str(cfg.get("torch_dtype", "dtype", default="bfloat16")).replace("torch.", "")
    dtype_bytes = _DTYPE_BYTES.get(dtype, 2)
    heads = cfg.int("num_attention_heads", "n_heads", why="attention size")
    mla = cfg.get("kv_lora_rank") is not None
    kv_heads = cfg.int("num_key_value_heads", why="KV heads", default=heads)
    head_dim = int(cfg.get("head_dim", default=0) or hidden // heads)
    q_lora = int(cfg.get("q_lora_rank", default=0) or 0)
    if mla:
        kv_lora = cfg.int("kv_lora_rank", why="MLA KV size")
        nope = cfg.int("qk_nope_head_dim", why="MLA attention size")
        rope = cfg.int("qk_rope_head_dim", why="MLA KV size")
        v_dim = cfg.int("v_head_dim", why="MLA attention size")
    else:
        kv_lora, nope, rope, v_dim = 0, 0, 0, head_dim
    layer_types = cfg.get("layer_types")
    kv_layers = sum("full" in str(t) for t in layer_types) if isinstance(layer_types, list) else n_layers
    tie = bool(cfg.get("tie_word_embeddings", default=False))
    max_pos = cfg.int("max_position_embeddings", "max_sequence_length", "seq_length", why="context length")

    if "expert_format" in special and "nonexpert_format" in special:
        fmts: dict[str, WeightFormat] = {}  # both given: quantization_config need not be understood
        gsize = 128
    else:
        fmts, gsize = _checkpoint_formats(cfg, dtype_bytes)
    if "expert_format" in special:
        fmts["expert"] = parse_format(str(special["expert_format"]))
    if "nonexpert_format" in special:
        fmts.update(dict.fromkeys(("attention", "dense_mlp", "shared"), parse_format(str(special["nonexpert_format"]))))
    plain = dtype_bytes  # bytes per param of embeddings, lm_head, norms and router gates

    def lin(n: int, k: int, count: int = 1, comp: str = "attention") -> int:
        return count * fmts[comp].matrix_bytes(n, k)

    parts: list[WeightPart] = [WeightPart("embed_tokens", int(vocab * hidden * plain), "tp")]
    if not tie:
        parts.append(WeightPart("lm_head", int(vocab * hidden * plain), "tp"))
    if mla:
        q_in = q_lora or hidden
        rep = lin(kv_lora + rope, hidden, n_layers) + int((kv_lora + 2 * hidden) * plain * n_layers)
        if q_lora:
            rep += lin(q_lora, hidden, n_layers) + int(q_lora * plain * n_layers)
        parts.append(WeightPart("attention_replicated", rep, "replicated"))
        sharded = lin(heads * (nope + rope), q_in, n_layers) + lin(heads * (nope + v_dim), kv_lora, n_layers)
        sharded += lin(hidden, heads * v_dim, n_layers)
        parts.append(WeightPart("attention_sharded", sharded, "tp"))
        if special.get("mla_absorb_copy", True):
            # SGLang keeps kv_b_proj and adds w_kc/w_vc copies of it for the absorbed decode path.
            parts.append(WeightPart("mla_absorbed_kv_b", int(heads * (nope + v_dim) * kv_lora * plain * n_layers), "tp"))
    else:
        parts.append(WeightPart("attention_q_o", lin(heads * head_dim, hidden, n_layers) + lin(hidden, heads * head_dim, n_layers), "tp"))
        parts.append(WeightPart("attention_k_v", lin(kv_heads * head_dim, hidden, 2 * n_layers), "kv_heads"))
        parts.append(WeightPart("norms", int((2 * hidden + 2 * head_dim) * plain * n_layers), "replicated"))
    if n_dense:
        parts.append(WeightPart("dense_mlp", lin(dense_inter, hidden, 2 * n_dense, "dense_mlp")
                                + lin(hidden, dense_inter, n_dense, "dense_mlp"), "tp"))
    if shared_inter:
        parts.append(WeightPart("shared_experts", lin(shared_inter, hidden, 2 * n_moe, "shared")
                                + lin(hidden, shared_inter, n_moe, "shared"), "tp"))
    parts.append(WeightPart("router_gates", int(experts * hidden * plain * n_moe + hidden * plain), "replicated"))

    name = str(special.get("name") or Path(source).parent.name or cfg.get("model_type", default="model"))
    return ModelSizes(
        name=name, source=source, architecture=str((cfg.get("architectures", default=["?"]) or ["?"])[0]),
        model_type=str(cfg.get("model_type", default="")), num_layers=n_layers, num_dense_layers=n_dense,
        num_moe_layers=n_moe, n_routed_experts=experts, top_k=top_k, n_shared_experts=n_shared,
        hidden_size=hidden, moe_intermediate_size=moe_inter, dense_intermediate_size=dense_inter,
        shared_intermediate_size=shared_inter, vocab_size=vocab, tie_word_embeddings=tie,
        attention="mla" if mla else "gqa", num_attention_heads=heads, num_kv_heads=heads if mla else kv_heads,
        head_dim=head_dim, q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=v_dim, kv_layers=kv_layers, max_position_embeddings=max_pos, dtype_bytes=dtype_bytes,
        expert_format=fmts["expert"], nonexpert_format=fmts["attention"],
        cpu_group_size=int(special.get("cpu_group_size") or gsize), nonexpert_parts=tuple(parts),
    )
