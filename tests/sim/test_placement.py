"""The simulator's expert placement: popularity, the GPU share of routed tokens under each
placement, the recorder's dump, the uniform fallback, dynamic update and CPU back-ends."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tuner.sim.gains import PUBLISHED, placement_gains, seed_config
from tuner.sim.perfmodel.placement import FALLBACK_WARNING, flat, from_counts, layer_ranking, read_dump, top, zipf
from tuner.sim.perfmodel.startup import startup_check
from tuner.sim.perfmodel.steptime import StepModel
from tuner.sim.recording import record_dump
from tuner.sim.scenario import load_scenario

SKEWED = "kimi-k2-thinking-8xl20-skewed"


def test_zipf_is_a_distribution_and_flat_without_skew() -> None:
    assert sum(zipf(384, 0.15)) == pytest.approx(1.0)
    assert zipf(384, 0.15)[0] > zipf(384, 0.15)[-1]
    assert set(zipf(8, 0.0)) == {1 / 8}


def test_uniform_routing_keeps_the_uniform_formula() -> None:
    scn = load_scenario("kimi-k2-thinking-8xl20")
    model = StepModel.build(scn, replace(seed_config(scn), kt_num_gpu_experts=100,
                                         kt_expert_placement_strategy="frequency"))
    assert model.routing is None
    assert model.cpu_token_share == pytest.approx((384 - 100) / 384)


def test_frequency_puts_the_recorded_hot_experts_on_the_gpu(tmp_path: Path) -> None:
    scn = load_scenario(SKEWED)
    dump = record_dump(scn, 37 * 1280, tmp_path, seed=1, stamp=0.0)
    uniform = StepModel.build(scn, replace(seed_config(scn), kt_num_gpu_experts=77))
    freq = StepModel.build(scn, replace(seed_config(scn), kt_num_gpu_experts=77, kt_expert_placement_strategy="frequency",
                                        init_expert_location=str(dump)))
    assert uniform.cpu_token_share == pytest.approx(1 - 77 / 384)
    assert freq.cpu_token_share < uniform.cpu_token_share - 0.03   # the hot ranks moved to the GPU
    assert freq.decode(37, 500) < uniform.decode(37, 500)
    assert freq.rc.total_gpu_experts == uniform.rc.total_gpu_experts  # memory does not move with placement


def test_from_counts_takes_the_global_top_and_the_dump_round_trips(tmp_path: Path) -> None:
    scn = load_scenario(SKEWED)
    m = scn.model
    dump = record_dump(scn, 1e7, tmp_path, seed=0, stamp=1.0)
    assert dump.name == "expert_distribution_recorder_1.0.pt"
    counts = read_dump(str(dump), m.layers_total, m.experts)
    assert sum(counts[0]) == 0                        # the dense layer routes nothing
    moe = list(range(m.layers_total - m.layers_moe, m.layers_total))
    cpu = from_counts(counts, moe, scn.name, m.experts, 10)
    assert cpu == pytest.approx(top(m.experts, 10), abs=0.05)   # many tokens: the true top ten
    hottest = layer_ranking(scn.name, 5, m.experts)[0]
    assert counts[5][hottest] == max(counts[5])


@pytest.mark.parametrize("content, words", [
    (None, "No such file"), ({"rank": 0}, "does not contain 'logical_count'"),
    ({"logical_count": [[[1.0] * 384] * 3]}, "num_layers (3) doesn't match"),
])
def test_an_unusable_frequency_file_fails_start_up_in_the_servers_words(tmp_path: Path, content: object,
                                                                        words: str) -> None:
    scn = load_scenario(SKEWED)
    path = tmp_path / "dist.pt"
    if content is not None:
        path.write_text(json.dumps(content))
    st = startup_check(scn, replace(seed_config(scn), kt_num_gpu_experts=40, kt_expert_placement_strategy="frequency",
                                    init_expert_location=str(path)))
    assert not st.ok and any(words in e for e in st.error_lines)


def test_frequency_without_a_file_falls_back_to_uniform_with_only_a_warning() -> None:
    scn = load_scenario(SKEWED)
    cfg = replace(seed_config(scn), kt_num_gpu_experts=40, kt_expert_placement_strategy="frequency")
    st = startup_check(scn, cfg)
    assert st.ok and FALLBACK_WARNING in st.log_lines
    assert StepModel.build(scn, cfg).routing.components[0].cpu == flat(384, 40)  # type: ignore[union-attr]


def test_dynamic_update_acts_only_after_a_layerwise_prefill_and_costs_prefill_time() -> None:
    scn = load_scenario(SKEWED)
    cfg = replace(seed_config(scn), kt_num_gpu_experts=77, kt_gpu_prefill_token_threshold=1024)
    plain = StepModel.build(scn, cfg)
    dyn = StepModel.build(scn, replace(cfg, kt_enable_dynamic_expert_update=True))
    assert dyn.decode(37, 500) == plain.decode(37, 500)            # not updated yet
    assert dyn.prefill(4096) > plain.prefill(4096)                 # re-picking and copying the experts
    assert dyn.prefill(512) == plain.prefill(512)                  # below the threshold: no update
    updated = StepModel.build(scn, replace(cfg, kt_enable_dynamic_expert_update=True), updated=True)
    assert updated.decode(37, 500) < plain.decode(37, 500)
    no_threshold = StepModel.build(scn, replace(cfg, kt_gpu_prefill_token_threshold=0,
                                                kt_enable_dynamic_expert_update=True), updated=True)
    assert not no_threshold.updated                                # nothing ever triggers an update


def test_rawint4_backend_env_var_changes_cpu_speed() -> None:
    scn = load_scenario("kimi-k2-thinking-8xl20")
    cfg = replace(seed_config(scn), kt_num_gpu_experts=40)
    amx = StepModel.build(scn, cfg)
    assert StepModel.build(scn, replace(cfg, rawint4_backend="amx")).prefill(4096) == amx.prefill(4096)
    assert StepModel.build(scn, replace(cfg, rawint4_backend="avx2")).prefill(4096) > 2 * amx.prefill(4096)
    assert StepModel.build(scn, replace(cfg, rawint4_backend="amx_blocked")).decode(37, 500) < amx.decode(37, 500)
    other = replace(cfg, kt_method="AMXINT4", rawint4_backend="avx2")   # only the RAWINT4 kernel reads it
    assert StepModel.build(scn, other).rc.cpu_backend is None


def test_placement_gains_land_in_the_published_ranges() -> None:
    rows = placement_gains(load_scenario(SKEWED), (37, 1024, 256))
    (f_lo, f_hi), (d_lo, d_hi) = PUBLISHED["frequency"], PUBLISHED["dynamic"]
    assert [r.share for r in rows] == [0.1, 0.2, 0.3, 0.4]
    for r in rows:
        assert f_lo <= r.frequency_gain <= f_hi, r
        assert d_lo <= r.dynamic_gain <= d_hi, r
