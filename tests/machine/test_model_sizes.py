from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.errors import ConfigError
from tuner.machine.model import load_model_sizes, parse_format

MODELS = Path(__file__).resolve().parents[2] / "tuner" / "sim" / "models"
GB = 1e9


def sizes(name: str, overrides: dict | None = None):
    return load_model_sizes(MODELS / name, overrides)


@pytest.mark.parametrize("name, layers, dense, moe, experts, top_k, shared, attention", [
    ("kimi-k2-thinking", 61, 1, 60, 384, 8, 1, "mla"),
    ("deepseek-v3", 61, 3, 58, 256, 8, 1, "mla"),
    ("qwen3-30b-a3b", 48, 0, 48, 128, 8, 0, "gqa"),
    ("qwen3-235b-a22b", 94, 0, 94, 128, 8, 0, "gqa"),
])
def test_layer_and_expert_counts(name, layers, dense, moe, experts, top_k, shared, attention):
    m = sizes(name)
    assert (m.num_layers, m.num_dense_layers, m.num_moe_layers) == (layers, dense, moe)
    assert (m.n_routed_experts, m.top_k, m.n_shared_experts, m.attention) == (experts, top_k, shared, attention)


def test_expert_bytes_match_the_perf_model_table():
    kimi, dsv3 = sizes("kimi-k2-thinking"), sizes("deepseek-v3")
    assert kimi.params_per_expert == 3 * 7168 * 2048
    assert kimi.expert_format.name == "int4_g32" and kimi.nonexpert_format.name == "bf16"
    assert kimi.gpu_bytes_per_expert == 24_772_608  # INT4 g32 with bf16 scales: 24.77 MB
    assert dsv3.expert_format.name == "fp8_block128" and dsv3.nonexpert_format.name == "fp8_block128"
    assert dsv3.gpu_bytes_per_expert == 44_050_944  # FP8 block-128: 44.05 MB
    assert kimi.cpu_bytes_per_expert("AMXINT4") == 22_065_152
    assert kimi.cpu_bytes_per_expert("amxint8") == 44_085_248
    assert kimi.cpu_bytes_per_expert("BF16") == 88_080_384
    assert kimi.cpu_bytes_per_expert("RAWINT4") == 3 * (7168 * 2048 // 2 + 4 * 7168 * 2048 // 32)
    assert kimi.cpu_expert_bytes_total("AMXINT4") / GB == pytest.approx(508.4, abs=0.5)
    assert dsv3.cpu_expert_bytes_total("AMXINT4") / GB == pytest.approx(327.6, abs=0.5)
    q30 = sizes("qwen3-30b-a3b")
    assert q30.gpu_bytes_per_expert / 1e6 == pytest.approx(9.44, abs=0.01)
    assert q30.cpu_bytes_per_expert("AMXINT4") / 1e6 == pytest.approx(2.37, abs=0.01)
    # GPU experts per unit of N per GPU, Kimi INT4 at TP8: 0.186 GB; layerwise slot at TP1: ~9.5 GB.
    assert kimi.gpu_expert_bytes_per_gpu(1, 8) / GB == pytest.approx(0.186, abs=0.001)
    assert kimi.layerwise_slot_bytes(1) / GB == pytest.approx(9.51, abs=0.02)
    assert kimi.gpu_expert_bytes_per_gpu(10_000, 1) == kimi.gpu_expert_bytes_per_gpu(384, 1)  # clamped to E


def test_kv_cells():
    for name in ("kimi-k2-thinking", "deepseek-v3"):
        m = sizes(name)
        assert [m.kv_bytes_per_token(tp) for tp in (1, 8)] == [70_272, 70_272]  # replicated on every rank
        assert m.kv_bytes_per_token(8, kv_dtype_bytes=1) == 35_136
        assert m.sglang_kt_profile_cell(8) == 23_424  # (qk_nope 128 + rope 64) * 61 * 2
    q30, q235 = sizes("qwen3-30b-a3b"), sizes("qwen3-235b-a22b")
    assert [q30.kv_bytes_per_token(tp) for tp in (1, 2, 4, 8)] == [98_304, 49_152, 24_576, 24_576]
    assert [q235.kv_bytes_per_token(tp) for tp in (1, 8)] == [192_512, 48_128]
    assert q30.sglang_kt_profile_cell(4) == q30.kv_bytes_per_token(4)


def test_nonexpert_weights_and_tp_split():
    kimi = sizes("kimi-k2-thinking", {"mla_absorb_copy": False})
    assert kimi.nonexpert_bytes_per_gpu(1) / GB == pytest.approx(23.4, abs=0.1)
    assert kimi.nonexpert_bytes_per_gpu(8) / GB == pytest.approx(4.8, abs=0.1)
    parts = {p.name: p.sharding for p in kimi.nonexpert_parts}
    assert parts["attention_replicated"] == "replicated" and parts["router_gates"] == "replicated"
    assert parts["embed_tokens"] == "tp" and parts["shared_experts"] == "tp"
    # SGLang's absorbed-MLA copies of kv_b_proj (w_kc, w_vc) add ~1 GB at TP1.
    with_copy = sizes("kimi-k2-thinking")
    assert with_copy.nonexpert_bytes_per_gpu(1) - kimi.nonexpert_bytes_per_gpu(1) == pytest.approx(1.02e9, rel=0.01)
    dsv3 = sizes("deepseek-v3", {"mla_absorb_copy": False})
    assert 18.5 < dsv3.nonexpert_bytes_per_gpu(1) / GB < 21  # FP8 linears, BF16 embeddings
    bf16 = sizes("deepseek-v3", {"mla_absorb_copy": False, "nonexpert_format": "bf16"})
    assert bf16.nonexpert_bytes_per_gpu(1) / GB == pytest.approx(34.2, abs=0.2)
    q30 = sizes("qwen3-30b-a3b")
    assert q30.nonexpert_bytes_per_gpu(1) / GB == pytest.approx(3.1, abs=0.1)
    assert q30.nonexpert_bytes_per_gpu(8) / GB == pytest.approx(0.43, abs=0.03)
    q235 = sizes("qwen3-235b-a22b")
    assert q235.nonexpert_bytes_per_gpu(1) / GB == pytest.approx(16.0, abs=0.1)
    assert q235.nonexpert_bytes_per_gpu(8) / GB == pytest.approx(2.2, abs=0.1)


def test_text_config_nesting_gives_the_same_sizes(tmp_path):
    inner = json.loads((MODELS / "kimi-k2-thinking" / "config.json").read_text())
    wrapped = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
               "vision_config": {"hidden_size": 1152}, "text_config": inner}
    (tmp_path / "config.json").write_text(json.dumps(wrapped))
    nested, flat = load_model_sizes(tmp_path), sizes("kimi-k2-thinking")
    assert nested.gpu_bytes_per_expert == flat.gpu_bytes_per_expert
    assert nested.nonexpert_bytes_per_gpu(8) == flat.nonexpert_bytes_per_gpu(8)
    assert nested.kv_bytes_per_token(8) == flat.kv_bytes_per_token(8)


def test_overrides_replace_config_fields():
    m = sizes("qwen3-30b-a3b", {"num_experts": 64, "mlp_only_layers": [0, 1], "name": "tiny"})
    assert (m.n_routed_experts, m.num_moe_layers, m.num_dense_layers, m.name) == (64, 46, 2, "tiny")
    assert sizes("qwen3-30b-a3b", {"expert_format": "int4_g128"}).gpu_bytes_per_expert < 2.7e6


def _write(tmp_path: Path, drop: str = "", **extra) -> Path:
    cfg = json.loads((MODELS / "qwen3-30b-a3b" / "config.json").read_text())
    cfg.pop(drop, None)
    cfg.update(extra)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_missing_field_names_it_and_the_override(tmp_path):
    path = _write(tmp_path, drop="moe_intermediate_size")
    with pytest.raises(ConfigError, match="moe_intermediate_size") as err:
        load_model_sizes(path)
    assert "model:" in str(err.value)
    assert load_model_sizes(path, {"moe_intermediate_size": 768}).gpu_bytes_per_expert == sizes("qwen3-30b-a3b").gpu_bytes_per_expert


def test_bad_field_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model_sizes(_write(tmp_path, num_hidden_layers="many"))
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing)):
        load_model_sizes(missing)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model_sizes(tmp_path)


def test_unknown_quantisation_and_kt_method(tmp_path):
    path = _write(tmp_path, quantization_config={"quant_method": "exotic"})
    with pytest.raises(ConfigError, match="expert_format"):
        load_model_sizes(path)
    assert load_model_sizes(path, {"expert_format": "fp8_block128", "nonexpert_format": "bf16"}).expert_format.block == 128
    with pytest.raises(ConfigError, match="kt-method"):
        sizes("qwen3-30b-a3b").cpu_bytes_per_expert("AMXINT3")


def test_weight_formats():
    assert parse_format("int4_g128_asym").matrix_bytes(128, 256) == 128 * 256 // 2 + 128 * 2 * (2 + 0.5)
    assert parse_format("fp8").matrix_bytes(10, 10) == 100 + 40
    assert parse_format("mxfp4").matrix_bytes(32, 64) == 32 * 64 // 2 + 32 * 2
    with pytest.raises(ConfigError):
        parse_format("int4")
