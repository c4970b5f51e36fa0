"""Scenarios, flag defaults, startup memory checks and step times of the simulated server."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import yaml

from tuner.errors import ConfigError
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.perfmodel.startup import runtime_extra_gb, runtime_oom, startup_check
from tuner.sim.perfmodel.steptime import StepModel, decode_step_time, prefill_chunk_time
from tuner.sim.scenario import SCENARIO_DIR, list_scenarios, load_scenario, scenario_from_dict

KIMI = "kimi-k2-thinking-8xl20"
SEED = SimConfig(tp=8, kt_weight_path="/w", kt_num_gpu_experts=200, kt_cpuinfer=56,
                 kt_threadpool_count=2, chunked_prefill_size=4096, max_running_requests=37,
                 max_total_tokens=37000, mem_fraction_static=0.98, enable_mixed_chunk=True)


@pytest.fixture(scope="module")
def kimi():
    return load_scenario(KIMI)


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((SCENARIO_DIR / f"{name}.yaml").read_text())


def _variant(name: str, **sections: dict[str, Any]):
    raw = _raw(name)
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return scenario_from_dict(raw)


def decode_tps(scn, cfg, batch=37):
    return batch / decode_step_time(scn, cfg, batch, 266)


# ----------------------------------------------------------------------------- scenarios

def test_shipped_scenarios_load_with_model_facts():
    assert set(list_scenarios()) >= {KIMI, "deepseek-v3-8x4090-48g", "qwen3-30b-a3b-1x4090"}
    thresholds = {KIMI: 192, "deepseek-v3-8x4090-48g": 128, "qwen3-30b-a3b-1x4090": 64}
    for name, thr in thresholds.items():
        m = load_scenario(name).model
        assert m.amx_threshold == thr
        # AMXINT4 bytes per expert = sum over 3 matrices of n*k/2 + 4n (INT4 weights plus scales)
        h, i = m.hidden, m.moe_intermediate
        amx4 = 2 * (i * h / 2 + 4 * i) + (h * i / 2 + 4 * h)
        assert m.cpu_bytes_per_expert["AMXINT4"] == pytest.approx(amx4, rel=0.01)
    qwen = load_scenario("qwen3-30b-a3b-1x4090").model
    assert qwen.kv_bytes_per_token(1) == 98304 and qwen.kv_bytes_per_token(4) == 24576
    kimi = load_scenario(KIMI)
    assert kimi.model.kv_bytes_per_token(8) == 70272
    assert kimi.model.kv_profile_bytes_per_token(8, quirk=True) == 23424
    assert kimi.model.nonexpert_gb(8) == pytest.approx(4.8, abs=0.05)
    assert kimi.cpu.peak_bw_gbs == pytest.approx(614.4)


def test_load_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(_raw(KIMI) | {"name": "mine"}))
    assert load_scenario(str(path)).name == "mine"
    with pytest.raises(ConfigError, match="scenario must be one of"):
        load_scenario("no-such-scenario")


def test_a_scenario_with_a_base_states_only_what_differs(tmp_path):
    path = tmp_path / "whatif.yaml"
    path.write_text(yaml.safe_dump({"name": "whatif", "base": KIMI, "gpu": {"count": 4},
                                    "constants": {"act_rep_bytes": 60.0}}))
    base, what_if = load_scenario(KIMI), load_scenario(str(path))
    assert what_if.name == "whatif" and what_if.gpu.count == 4 and what_if.constants["act_rep_bytes"] == 60.0
    assert what_if.gpu.visible_memory_gib == base.gpu.visible_memory_gib  # the rest of a section is the base's
    assert what_if.model == base.model and what_if.cpu == base.cpu
    assert what_if.constants["tau"] == base.constants["tau"]
    path.write_text(yaml.safe_dump({"name": "whatif", "base": "whatif"}))
    with pytest.raises(ConfigError, match="scenario field 'base'"):
        load_scenario(str(path))
    path.write_text(yaml.safe_dump({"name": "whatif", "base": "no-such-scenario"}))
    with pytest.raises(ConfigError, match="scenario must be one of"):
        load_scenario(str(path))


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r["model"].pop("experts"), "model.experts"),
    (lambda r: r["gpu"].update(count="eight"), "gpu.count"),
    (lambda r: r["cpu"].update(amx="yes"), "cpu.amx"),
    (lambda r: r["model"].update(attention="mha"), "model.attention"),
    (lambda r: r.update(constants={"eta_bww": 0.3}), "constants.eta_bww"),
    (lambda r: r["model"].update(layers_moe=99), "model.layers_moe"),
    (lambda r: r["model"]["cpu_bytes_per_expert"].update(AMXINT4=-1), "cpu_bytes_per_expert.AMXINT4"),
])
def test_validation_names_the_field(mutate, field):
    raw = _raw(KIMI)
    mutate(raw)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        scenario_from_dict(raw)


def test_constant_override_changes_the_model(kimi):
    faster = _variant(KIMI, constants={"eta_bw": 0.58})
    assert faster.c("eta_bw") == 0.58 and kimi.c("eta_bw") == 0.29
    assert decode_tps(faster, SEED) > 1.5 * decode_tps(kimi, SEED)


# ----------------------------------------------------------------------------- defaults

def test_sglang_defaults_by_vram_bucket(kimi):
    rc = SimConfig(tp=8).resolved(kimi)
    assert (rc.chunk, rc.graph_max_bs, rc.kt_on) == (4096, 160, False)
    qwen = load_scenario("qwen3-30b-a3b-1x4090")
    rq = SimConfig(tp=1).resolved(qwen)
    assert (rq.chunk, rq.graph_max_bs) == (2048, 24)
    assert rq.mfs == pytest.approx((24564 - 512 - 1.5 * 2048 - 48 - 128) / 24564, abs=2e-3)
    h100 = _variant(KIMI, gpu={"visible_memory_gib": 81559 / 1024})
    rh = SimConfig(tp=1).resolved(h100)
    assert rh.chunk == 8192 and rh.mfs == pytest.approx(0.835, abs=0.003)
    assert SimConfig(tp=8, disable_cuda_graph=True).resolved(kimi).graph_max_bs == 0


def test_expert_count_rules(kimi):
    assert replace(SEED, kt_num_gpu_experts=999).resolved(kimi).gpu_experts == 384
    by_ratio = replace(SEED, kt_gpu_experts_ratio=0.25).resolved(kimi)
    assert by_ratio.total_gpu_experts == 5760 and by_ratio.gpu_experts == pytest.approx(96)
    off = replace(SEED, kt_num_gpu_experts=None).resolved(kimi)
    assert not off.kt_on and off.gpu_experts == 384
    assert "Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set." in off.notes
    res = startup_check(kimi, replace(SEED, kt_num_gpu_experts=None))
    assert not res.ok and res.stage == "weights"
    assert res.error_lines[0].startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")


# ----------------------------------------------------------------------------- startup

def test_seed_starts_with_sglang_log_lines(kimi):
    res = startup_check(kimi, SEED)
    assert res.ok and res.stage is None and res.error_lines == []
    assert res.kv_tokens == 37000 and res.max_running_requests == 37 and res.runtime_ok
    text = "\n".join(res.log_lines)
    assert "Using kt_num_gpu_experts=200 per layer, total GPU experts: 12000" in text
    assert "KV Cache is allocated. #tokens: 37000, KV size: 2.42 GB" in text
    assert "Load weight end." in text and "max_total_num_tokens=37000, chunked_prefill_size=4096" in text
    mem = res.mem_per_gpu_gb
    assert 42.0 < mem["total"] < mem["capacity"] and mem["excess"] < 0
    assert mem["weights"] == pytest.approx(4.47 + 34.6 + 0.05, abs=0.1)


def test_gpu_expert_cliff(kimi):
    rates = [decode_tps(kimi, replace(SEED, kt_num_gpu_experts=n)) for n in (0, 100, 150, 200, 206)]
    assert rates == sorted(rates) and rates[0] == pytest.approx(22.8, rel=0.05)
    assert startup_check(kimi, replace(SEED, kt_num_gpu_experts=206)).runtime_ok
    past = startup_check(kimi, replace(SEED, kt_num_gpu_experts=230))
    assert not past.ok and past.stage in ("weights", "kv_profile", "kv_alloc", "cuda_graph")
    assert "memory" in past.error_lines[0] and past.mem_per_gpu_gb["excess"] > 0
    past_mfs = startup_check(kimi, replace(SEED, kt_num_gpu_experts=220))
    assert past_mfs.stage in ("kv_alloc", "cuda_graph")
    assert "CUDA out of memory" in past_mfs.error_lines[0]
    fits = [n for n in range(200, 231, 2)
            if startup_check(kimi, replace(SEED, kt_num_gpu_experts=n)).runtime_ok]
    assert 204 <= max(fits) <= 212


def test_chunk_size_memory_and_speed(kimi):
    speeds = [4096 / prefill_chunk_time(kimi, replace(SEED, chunked_prefill_size=c), 4096)
              for c in (4096,)]
    assert speeds[0] == pytest.approx(570, rel=0.05)
    tps = [c / prefill_chunk_time(kimi, SEED, c) for c in (1024, 2048, 4096, 8192, 16384)]
    assert tps == sorted(tps)
    big = replace(SEED, chunked_prefill_size=16384)
    res = startup_check(kimi, big)
    assert res.ok and not res.runtime_ok          # 16K OOMs at run time, not at launch
    assert runtime_oom(kimi, big, 16384, res) is not None
    assert runtime_oom(kimi, big, 4096, res) is None
    assert startup_check(kimi, replace(SEED, chunked_prefill_size=8192)).runtime_ok
    assert runtime_extra_gb(kimi, SEED, 8192) == pytest.approx(2 * runtime_extra_gb(kimi, SEED, 4096))


def test_decode_calibration_and_batch_shape(kimi):
    assert decode_step_time(kimi, SEED, 37, 0) == pytest.approx(0.809, rel=0.02)
    itl = [decode_step_time(kimi, SEED, b, 0) for b in (1, 4, 16, 37, 64, 128)]
    tps = [b / t for b, t in zip((1, 4, 16, 37, 64, 128), itl)]
    assert itl == sorted(itl) and tps == sorted(tps)
    assert tps[0] == pytest.approx(11.0, rel=0.05)
    # long contexts read the KV cache every step
    assert decode_step_time(kimi, SEED, 37, 30000) > decode_step_time(kimi, SEED, 37, 100)


def test_threads_and_numa(kimi):
    def tps(t, p=2):
        return decode_tps(kimi, replace(SEED, kt_cpuinfer=t, kt_threadpool_count=p))
    assert tps(56) == pytest.approx(45.7, rel=0.03)
    assert tps(56, p=1) < 0.5 * tps(56) and tps(28, p=1) < 0.6 * tps(28)
    assert tps(16) < tps(32) < tps(48) <= tps(56)             # plateau below free cores
    assert tps(56) > tps(60) > tps(64) > tps(80) > tps(128)   # contention, then oversubscription
    pre = [4096 / prefill_chunk_time(kimi, replace(SEED, kt_cpuinfer=t), 4096) for t in (32, 56, 64)]
    assert pre[1] > pre[0] and pre[1] > pre[2]


@pytest.mark.parametrize("cfg, text", [
    (replace(SEED, kt_cpuinfer=None), "TypeError"),
    (replace(SEED, kt_threadpool_count=3), "scheduler is dead"),
    (replace(SEED, kt_method="NOPE"), "Unsupported kt_method"),
])
def test_cpu_launch_failures(kimi, cfg, text):
    res = startup_check(kimi, cfg)
    assert not res.ok and res.stage == "cpu" and text in res.error_lines[0]


def test_threadpool_must_divide_intermediate():
    four_nodes = _variant(KIMI, cpu={"numa_nodes": 4})
    res = startup_check(four_nodes, replace(SEED, kt_threadpool_count=3, kt_cpuinfer=54))
    assert res.stage == "cpu" and "moe_intermediate_size (2048)" in res.error_lines[0]
    assert startup_check(four_nodes, replace(SEED, kt_threadpool_count=4)).ok


def test_args_and_chunk_minus_one(kimi):
    assert startup_check(kimi, replace(SEED, tp=3)).stage == "args"
    assert startup_check(kimi, replace(SEED, tp=16)).stage == "args"
    res = startup_check(kimi, replace(SEED, chunked_prefill_size=-1))
    assert res.stage == "weights" and "negative dimension" in res.error_lines[0]


def test_kv_profiling_quirk_and_mem_fraction(kimi):
    no_cap = replace(SEED, max_total_tokens=None)
    res = startup_check(kimi, no_cap)
    assert res.stage == "kv_alloc" and "CUDA out of memory" in res.error_lines[0]
    fixed = _variant(KIMI, constants={"mla_profile_quirk": 0})
    upstream = startup_check(fixed, replace(no_cap, mem_fraction_static=0.95))
    assert upstream.ok and 37000 < upstream.kv_tokens < 60000
    # with mfs 0.98 the correctly profiled pool leaves too little for the CUDA graphs
    assert startup_check(fixed, no_cap).stage == "cuda_graph"
    low = startup_check(kimi, replace(SEED, mem_fraction_static=0.80))
    assert low.stage == "kv_profile"
    assert "Not enough memory. Please try to increase --mem-fraction-static" in low.error_lines[0]
    qwen = load_scenario("qwen3-30b-a3b-1x4090")
    q = SimConfig(tp=1, kt_weight_path="/w", kt_num_gpu_experts=38, kt_cpuinfer=22,
                  kt_threadpool_count=1, max_running_requests=16, max_total_tokens=32000,
                  mem_fraction_static=0.9)
    clipped = startup_check(qwen, q)
    assert clipped.ok and clipped.kv_tokens < 32000
    assert any("is larger than the profiled value" in line for line in clipped.log_lines)


def test_graph_capture_failure(kimi):
    res = startup_check(kimi, replace(SEED, kt_num_gpu_experts=212, cuda_graph_max_bs=160,
                                      max_running_requests=160))
    assert res.stage == "cuda_graph" and res.error_lines[0].startswith("Capture cuda graph failed")


def test_fuzzy_oom_band_is_seeded(kimi):
    edge = replace(SEED, kt_num_gpu_experts=208)
    free = {s: startup_check(kimi, edge, fuzz_seed=s).mem_per_gpu_gb for s in range(4)}
    avail = [startup_check(kimi, edge, fuzz_seed=s).runtime_free_gb for s in range(12)]
    assert len(set(round(a, 6) for a in avail)) > 5 and max(avail) - min(avail) <= 0.8
    assert startup_check(kimi, edge, fuzz_seed=3).runtime_free_gb == \
        startup_check(kimi, edge, fuzz_seed=3).runtime_free_gb
    assert free[0]["weights"] == free[1]["weights"]


def test_deferral_and_layerwise_prefill(kimi):
    base = decode_tps(kimi, SEED)
    deferred = decode_tps(kimi, replace(SEED, kt_max_deferred_experts_per_token=2))
    assert base < deferred <= 1.45 * base
    amx = replace(SEED, kt_gpu_prefill_token_threshold=2048)
    assert amx.resolved(kimi).layerwise_threshold == 0      # not a native format
    native = replace(SEED, kt_method="RAWINT4", kt_gpu_prefill_token_threshold=2048)
    assert native.resolved(kimi).layerwise_threshold == 2048
    assert prefill_chunk_time(kimi, native, 4096) < 0.7 * prefill_chunk_time(kimi, SEED, 4096)
    slot = runtime_extra_gb(kimi, native, 4096) - runtime_extra_gb(kimi, SEED, 4096)
    assert slot == pytest.approx(384 * 24.77e6 / 8 / 2**30, rel=0.01)
    assert runtime_extra_gb(kimi, native, 1024) == pytest.approx(runtime_extra_gb(kimi, SEED, 1024))


def test_distinct_experts_and_no_graph_penalty(kimi):
    sm = StepModel.build(kimi, SEED)
    assert sm.distinct(37) == pytest.approx(207.8, abs=0.5)
    assert sm.distinct(1) == pytest.approx(8)
    nog = replace(SEED, disable_cuda_graph=True)
    assert decode_step_time(kimi, nog, 37, 0) > decode_step_time(kimi, SEED, 37, 0)
