from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tuner.errors import ConfigError
from tuner.feasibility.anchor import calibrate_from_log, calibration_from_observed
from tuner.feasibility.calibration import MemoryCalibration
from tuner.feasibility.check import check, max_gpu_experts
from tuner.feasibility.plan import auto_max_total_tokens, auto_mem_fraction, default_chunk, default_graph_bs, resolve_launch
from tuner.machine.hardware import GIB, MIB, CpuSpec, GpuSpec, Hardware
from tuner.machine.model import load_model_sizes

MODELS = Path(__file__).resolve().parents[2] / "tuner" / "sim" / "models"
KIMI = load_model_sizes(MODELS / "kimi-k2-thinking")
QWEN30 = load_model_sizes(MODELS / "qwen3-30b-a3b")


def machine(gpus: int, vram_mib: int, sockets: int = 2, cores: int = 32, ram_gib: int = 1024, amx: bool = True) -> Hardware:
    cpu = CpuSpec("Xeon", sockets, sockets * cores, 2 * sockets * cores, sockets, (cores,) * sockets, amx, True)
    return Hardware(tuple(GpuSpec(i, "GPU", vram_mib * MIB, vram_mib * MIB) for i in range(gpus)), cpu,
                    ram_gib * GIB, ram_gib * GIB)


L20X8 = machine(8, 46068)  # nvidia-smi shows 46068 MiB per L20; 2x Gold 6454S (32 cores each)
SEED = {"kt-weight-path": "/w", "kt-cpuinfer": 56, "kt-threadpool-count": 2, "kt-num-gpu-experts": 200,
        "kt-method": "AMXINT4", "mem-fraction-static": 0.98, "chunked-prefill-size": 4096,
        "max-running-requests": 37, "max-total-tokens": 37000, "enable-mixed-chunk": True,
        "tensor-parallel-size": 8, "attention-backend": "flashinfer"}
SEED_WL = [(37, 1024, 1), (37, 10, 512)]


def test_seed_fits_and_its_numbers_add_up():
    r = check(KIMI, L20X8, SEED, SEED_WL)
    assert r.feasible and r.binding is None and r.fix_hint() == ""
    assert all(v <= 0 for v in r.constraints.values())
    b = r.breakdown_gb
    assert b["gpu_experts"] == pytest.approx(200 * 60 * 24.772608e-3 / 8, abs=0.01)  # 37.16 GB
    assert b["kv"] == pytest.approx(37000 * 70272 / 1e9, abs=0.001)  # 2.60 GB
    assert b["staging"] == pytest.approx(4096 * 7168 * 2 / 1e9, abs=0.001)
    assert 4.7 < b["weights_nonexpert"] < 5.1
    assert 0.1 < b["activations"] / 4096 * 1000 < 0.4  # MB per chunk token at TP8 (facts: <= 0.4)
    assert b["available"] < b["free"]
    assert r.kv_capacity_tokens == 37000 and r.kv_capacity_requests == 37000 // 1025
    assert "fits" in r.explain() and "gpu_experts" in r.explain()


def test_more_gpu_experts_than_the_cliff_do_not_fit():
    r = check(KIMI, L20X8, {**SEED, "kt-num-gpu-experts": 230}, SEED_WL)
    assert not r.feasible and r.binding.startswith("gpu_mem_")
    n = max_gpu_experts(KIMI, L20X8, SEED, SEED_WL)
    assert 200 < n < 215  # facts: cliff ~205-210
    assert check(KIMI, L20X8, {**SEED, "kt-num-gpu-experts": n}, SEED_WL).feasible
    over = check(KIMI, L20X8, {**SEED, "kt-num-gpu-experts": n + 1}, SEED_WL)
    assert not over.feasible and f"kt-num-gpu-experts to {n}" in over.fix_hint()
    assert "DOES NOT FIT" in over.explain() and "fix:" in over.explain()


def test_bigger_chunks_and_margins_leave_fewer_gpu_experts():
    ns = [max_gpu_experts(KIMI, L20X8, {**SEED, "chunked-prefill-size": c}, SEED_WL) for c in (2048, 8192, 16384)]
    assert ns[0] >= ns[1] > ns[2]
    assert max_gpu_experts(KIMI, L20X8, SEED, SEED_WL, margin_gb=4.0) < max_gpu_experts(KIMI, L20X8, SEED, SEED_WL)
    # Startup keeps the margin; at run time the activations take its place.
    big = check(KIMI, L20X8, {**SEED, "chunked-prefill-size": 16384}, SEED_WL)
    assert big.binding == "gpu_mem_runtime_gb" and "chunked-prefill-size to" in big.fix_hint()


def test_qwen30b_on_one_24gb_gpu_has_an_interior_cliff():
    hw = machine(1, 24564, sockets=1, cores=16, ram_gib=128, amx=False)
    flags = {"kt-weight-path": "/w", "kt-cpuinfer": 15, "kt-threadpool-count": 1, "kt-num-gpu-experts": 8,
             "max-running-requests": 16, "max-total-tokens": 20000}
    wl = [(16, 1024, 256)]
    n = max_gpu_experts(QWEN30, hw, flags, wl)
    assert 10 < n < QWEN30.n_routed_experts
    assert check(QWEN30, hw, {**flags, "kt-num-gpu-experts": n}, wl).feasible
    assert not check(QWEN30, hw, {**flags, "kt-num-gpu-experts": n + 1}, wl).feasible
    plan = resolve_launch(QWEN30, hw, flags)
    assert (plan.chunk, plan.graph_max_bs) == (2048, 24) and plan.mfs == pytest.approx(0.847, abs=0.002)
    warn = check(QWEN30, hw, flags, wl).warnings
    assert any("AVX-512" in w for w in warn)  # AMXINT4 without AMX


@pytest.mark.parametrize("change, binding", [
    ({"kt-cpuinfer": 128}, "cpuinfer_over_cores"),
    ({"kt-threadpool-count": 3}, "threadpool_over_numa"),
    ({"tensor-parallel-size": 16}, "tp_over_gpus"),
    ({"tensor-parallel-size": 3}, "tp_divides_heads"),
    ({"chunked-prefill-size": -1}, "chunked_prefill_below_1"),
    ({"kt-cpuinfer": None}, "kt_cpuinfer_missing"),
    ({"max-total-tokens": 1000}, "kv_tokens_short"),
    ({"context-length": 512}, "context_len_short"),
])
def test_violations_are_named(change, binding):
    r = check(KIMI, L20X8, {**SEED, **change}, SEED_WL)
    assert not r.feasible and r.binding == binding and r.constraints[binding] > 0
    assert r.fix_hint()


def test_threadpools_must_divide_the_expert_width():
    hw = replace(L20X8, cpu=replace(L20X8.cpu, numa_nodes=4, cores_per_node=(16,) * 4))
    model = replace(KIMI, moe_intermediate_size=1536)
    r = check(model, hw, {**SEED, "kt-threadpool-count": 4}, SEED_WL)
    assert r.constraints["threadpool_divides_intermediate"] == 0  # 1536 % 4
    r = check(KIMI, hw, {**SEED, "kt-threadpool-count": 3, "kt-cpuinfer": 48}, SEED_WL)
    assert r.constraints["threadpool_divides_intermediate"] == 2048 % 3 and "e.g. 2" in r.fix_hint()


def test_soft_limits_warn_but_still_fit():
    r = check(KIMI, L20X8, {**SEED, "kt-cpuinfer": 60}, SEED_WL)
    assert r.feasible and r.soft_constraints["cpuinfer_over_free_cores"] == 4
    assert any("physical cores - GPUs" in w for w in r.warnings)
    r = check(KIMI, L20X8, {**SEED, "kt-threadpool-count": 1}, SEED_WL)
    assert r.feasible and r.soft_constraints["threads_per_pool_over_node"] > 0
    # The seed's prefill job asks 37 x 1024.7 tokens of a 37000-token pool: retraction risk only.
    assert check(KIMI, L20X8, SEED, SEED_WL).soft_constraints["kv_tokens_per_request_short"] > 0


def test_unset_max_total_tokens_oversizes_mla_kv():
    flags = {k: v for k, v in SEED.items() if k != "max-total-tokens"}
    r = check(KIMI, L20X8, flags, SEED_WL)
    assert not r.feasible and r.binding == "gpu_mem_startup_gb"
    assert any("third" in w for w in r.warnings) and "max-total-tokens" in r.fix_hint()
    fixed = check(KIMI, L20X8, flags, SEED_WL, calibration=MemoryCalibration(sglang_kt_profile_quirk=False))
    assert fixed.kv_capacity_tokens * 3 < r.kv_capacity_tokens + 3


def test_layerwise_prefill_slot_is_a_runtime_cost():
    r = check(KIMI, L20X8, {**SEED, "kt-gpu-prefill-token-threshold": 4096}, SEED_WL)
    assert r.breakdown_gb["layerwise_slot"] == pytest.approx(384 * 24.772608e-3 / 8, abs=0.01)
    assert r.binding == "gpu_mem_runtime_gb" and "kt-gpu-prefill-token-threshold" in r.fix_hint()
    assert check(KIMI, L20X8, {**SEED, "kt-gpu-prefill-token-threshold": 8192}, SEED_WL).feasible


def test_kt_off_puts_every_expert_on_gpu():
    r = check(KIMI, L20X8, {k: v for k, v in SEED.items() if k != "kt-weight-path"}, SEED_WL)
    assert not r.feasible and any("KT is off" in w for w in r.warnings)
    assert "cpuinfer_over_cores" not in r.constraints and "kt-weight-path" in r.fix_hint()


def test_host_ram_holds_all_cpu_experts():
    r = check(KIMI, machine(8, 46068, ram_gib=256), SEED, SEED_WL)
    assert r.binding == "cpu_ram_gb" and "508 GB" in r.fix_hint()
    assert check(KIMI, L20X8, SEED, SEED_WL).constraints["cpu_ram_gb"] < 0


def test_cpu_without_avx512_cannot_run_amx_methods():
    hw = replace(L20X8, cpu=replace(L20X8.cpu, amx=False, avx512=False))
    assert check(KIMI, hw, SEED, SEED_WL).binding == "cpu_isa_missing"
    assert "cpu_isa_missing" not in check(KIMI, hw, {**SEED, "kt-method": "BF16"}, SEED_WL).constraints


def test_sglang_defaults():
    assert [default_chunk(g) for g in (22.9, 45.0, 79.6, 131.0, 180.0)] == [2048, 4096, 8192, 8192, 16384]
    assert [default_graph_bs(45.0, tp) for tp in (1, 8)] == [32, 160]
    assert [default_graph_bs(23.9, tp) for tp in (1, 4)] == [24, 80]
    assert default_graph_bs(79.6, 1) == 256 and default_graph_bs(16, 1) == 8
    assert auto_mem_fraction(81559, 8192, 256, 1) == pytest.approx(0.835, abs=0.001)  # facts: H100 TP1
    plan = resolve_launch(KIMI, L20X8, {"tensor-parallel-size": 8, "kt-weight-path": "/w", "kt-gpu-experts-ratio": 0.5})
    assert plan.kt_enabled and plan.n_gpu_experts == 192 and plan.chunk == 4096 and plan.graph_max_bs == 160
    assert plan.mfs_auto and plan.context_len == 262144 and plan.kt_method == "AMXINT4" and plan.threadpools == 2


def test_bad_flag_values_are_config_errors():
    with pytest.raises(ConfigError, match="kt-num-gpu-experts"):
        check(KIMI, L20X8, {**SEED, "kt-num-gpu-experts": "lots"}, SEED_WL)
    with pytest.raises(ConfigError, match="mem-fraction-static"):
        check(KIMI, L20X8, {**SEED, "mem-fraction-static": 1.5}, SEED_WL)
    with pytest.raises(ConfigError, match="kt-method"):
        check(KIMI, L20X8, {**SEED, "kt-method": "INT3"}, SEED_WL)


def test_auto_max_total_tokens():
    assert auto_max_total_tokens(KIMI, L20X8, SEED, SEED_WL) == 41718  # ceil(37 x 1025 x 1.1)
    assert auto_max_total_tokens(KIMI, L20X8, {**SEED, "page-size": 64}, SEED_WL) % 64 == 0
    assert auto_max_total_tokens(KIMI, L20X8, {**SEED, "max-running-requests": 1}, [(4, 5000, 100)], headroom=0.5) == 5100
    assert auto_max_total_tokens(KIMI, L20X8, {**SEED, "max-running-requests": 512}, [(8, 100, 100)]) == 1760
    r = check(KIMI, L20X8, {**SEED, "max-total-tokens": "auto"}, SEED_WL)
    assert r.plan.max_total_tokens == 41718
    with pytest.raises(ConfigError):
        auto_max_total_tokens(KIMI, L20X8, SEED, [])


LOG = """\
[2025-11-07 10:00:01 TP0] Load weight begin. avail mem=44.52 GB
[2025-11-07 10:00:01 TP1] Load weight begin. avail mem=44.60 GB
[2025-11-07 10:03:11 TP0] Using kt_num_gpu_experts=200 per layer, total GPU experts: 12000
[2025-11-07 10:05:00 TP0] Load weight end. type=DeepseekV3ForCausalLM, dtype=torch.bfloat16, avail mem=4.99 GB, mem usage=39.53 GB.
[2025-11-07 10:05:00 TP1] Load weight end. type=DeepseekV3ForCausalLM, dtype=torch.bfloat16, avail mem=5.10 GB, mem usage=39.47 GB.
[2025-11-07 10:05:01 TP0] max_total_tokens=37000 is larger than the profiled value 36000. Use the profiled value instead.
[2025-11-07 10:05:01 TP0] KV Cache is allocated. #tokens: 36000, KV size: 2.36 GB
[2025-11-07 10:05:20 TP0] Capture cuda graph end. Time elapsed: 12.1 s. mem usage=0.31 GB. avail mem=2.05 GB.
[2025-11-07 10:05:21 TP0] max_total_num_tokens=36000, chunked_prefill_size=4096, max_prefill_tokens=16384, max_running_requests=37, context_len=262144, available_gpu_mem=2.05 GB
"""


def test_calibrate_from_log_and_fold_it_back():
    obs = calibrate_from_log(LOG)
    gib = 1.073741824
    assert obs["weights_gb"] == pytest.approx(39.53 * gib, abs=1e-3)  # worst rank, GiB -> GB
    assert obs["avail_before_weights_gb"] == pytest.approx(44.52 * gib, abs=1e-3)
    assert obs["kv_tokens"] == 36000 and obs["kv_size_gb"] == pytest.approx(2.36 * gib, abs=1e-3)
    assert obs["max_total_tokens_requested"] == 37000 and obs["max_total_tokens_profiled"] == 36000
    assert obs["cuda_graph_gb"] == pytest.approx(0.31 * gib, abs=1e-3)
    assert (obs["kt_gpu_experts_per_layer"], obs["kt_total_gpu_experts"], obs["max_running_requests"]) == (200, 12000, 37)
    assert obs["oom"] is False and obs["not_enough_memory"] is False
    assert calibrate_from_log("CUDA out of memory. Tried to allocate 2.00 GiB")["oom"] is True
    cal = calibration_from_observed(obs, KIMI, L20X8, SEED)
    assert cal.nonexpert_weight_gb == pytest.approx(39.53 * gib - 37.16 - 0.0587, abs=0.01)
    assert cal.graph_bytes_per_batch is not None and cal.graph_bytes_per_batch > 0
    before = max_gpu_experts(KIMI, L20X8, SEED, SEED_WL)
    after = max_gpu_experts(KIMI, L20X8, SEED, SEED_WL, calibration=cal)
    assert after < before  # the log shows heavier non-expert weights than predicted


def test_tp_must_be_positive():
    with pytest.raises(ConfigError, match="tensor-parallel-size"):
        check(KIMI, L20X8, {**SEED, "tensor-parallel-size": -2}, SEED_WL)
