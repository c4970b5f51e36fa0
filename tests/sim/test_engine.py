"""Scheduler emulation, virtual-time benchmarks and calibration against the seed document."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tuner.errors import InfeasibleConfig
from tuner.sim.api import SEED_WORKLOADS, predict
from tuner.sim.engine import Engine, run_workload
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.scenario import load_scenario

SEED = SimConfig(tp=8, kt_weight_path="/w", kt_num_gpu_experts=200, kt_cpuinfer=56,
                 kt_threadpool_count=2, chunked_prefill_size=4096, max_running_requests=37,
                 max_total_tokens=37000, mem_fraction_static=0.98, enable_mixed_chunk=True)
PREFILL = dict(num_prompts=37, input_len=1024, output_len=1)
DECODE = dict(num_prompts=37, input_len=10, output_len=512)


@pytest.fixture(scope="module")
def kimi():
    return load_scenario("kimi-k2-thinking-8xl20")


def drain(engine: Engine, limit: int = 100_000):
    steps = []
    while engine.has_work() and len(steps) < limit:
        steps.append(engine.step())
    return steps


# ----------------------------------------------------------------------------- calibration

def test_seed_calibration(kimi):
    dec = run_workload(kimi, SEED, **DECODE)
    pre = run_workload(kimi, SEED, **PREFILL)
    assert dec.fatal is None and pre.fatal is None
    assert dec.completed == pre.completed == 37
    assert dec.total_output_tokens == 37 * 512 and pre.total_input_tokens == 37 * 1024
    assert dec.output_throughput == pytest.approx(45.91, rel=0.05)
    assert pre.input_throughput == pytest.approx(577.74, rel=0.06)
    assert dec.median_itl_ms == pytest.approx(800.5, rel=0.05)
    assert dec.concurrency == pytest.approx(37.0, rel=0.01)
    assert 30_000 < pre.mean_ttft_ms < 45_000 and pre.mean_itl_ms == 0.0
    assert pre.p99_ttft_ms == pytest.approx(pre.duration * 1000, rel=0.02)


def test_predict_default_workloads(kimi):
    pred = predict(kimi, SEED)
    assert pred.feasible and pred.reason is None and set(pred.workloads) == set(SEED_WORKLOADS)
    assert pred.mem_per_gpu_gb["total"] < pred.mem_per_gpu_gb["capacity"]
    bad = predict(kimi, replace(SEED, kt_num_gpu_experts=230))
    assert not bad.feasible and bad.reason and bad.workloads == {}


def test_more_gpu_experts_raise_decode_throughput(kimi):
    tps = [run_workload(kimi, replace(SEED, kt_num_gpu_experts=n), **DECODE).output_throughput
           for n in (0, 100, 200, 206)]
    assert tps == sorted(tps) and tps[-1] > 1.9 * tps[0]


def test_threads_and_pools_in_benchmarks(kimi):
    def tps(**kw):
        return run_workload(kimi, replace(SEED, **kw), **DECODE).output_throughput
    base = tps()
    assert tps(kt_threadpool_count=1) < 0.5 * base
    assert tps(kt_cpuinfer=64) < base and tps(kt_cpuinfer=96) < tps(kt_cpuinfer=64)


def test_16k_chunk_dies_at_first_big_prefill(kimi):
    big = replace(SEED, chunked_prefill_size=16384)
    pre = run_workload(kimi, big, **PREFILL)
    assert pre.fatal is not None and "CUDA out of memory" in pre.fatal
    assert pre.completed == 0
    assert run_workload(kimi, big, **DECODE).fatal is None      # 370-token chunks never grow
    assert run_workload(kimi, replace(SEED, chunked_prefill_size=8192), **PREFILL).fatal is None


# ----------------------------------------------------------------------------- noise

def test_deterministic_without_noise(kimi):
    a = run_workload(kimi, SEED, **DECODE, seed=1)
    b = run_workload(kimi, SEED, **DECODE, seed=2)
    assert a == b


def test_noise_is_seeded(kimi):
    runs = [run_workload(kimi, SEED, **DECODE, noise_sigma=0.025, seed=s) for s in range(8)]
    again = run_workload(kimi, SEED, **DECODE, noise_sigma=0.025, seed=3)
    assert again == runs[3]
    tps = np.array([r.output_throughput for r in runs])
    assert len(set(tps.round(6))) == len(tps)
    assert 0.003 < tps.std() / tps.mean() < 0.08
    assert abs(tps.mean() / 45.91 - 1) < 0.1
    p95 = np.median([r.p95_itl_ms / r.median_itl_ms for r in runs])
    p99 = np.median([r.p99_itl_ms / r.median_itl_ms for r in runs])
    assert 1.03 < p95 < 1.08 and 1.05 < p99 < 1.13


# ----------------------------------------------------------------------------- scheduler

def test_prefill_packs_whole_requests_plus_one_partial(kimi):
    eng = Engine(kimi, SEED, noise_sigma=0)
    for i in range(3):
        assert eng.submit(f"r{i}", 1500, 4) is None
    first = eng.step()
    assert first.kind == "prefill" and [e[0] for e in first.emitted] == ["r0", "r1"]
    second = eng.step()       # finishes r2's prompt; r0, r1 ride along (mixed chunk)
    assert second.kind == "prefill"
    assert sorted(second.emitted) == [("r0", 2, False), ("r1", 2, False), ("r2", 1, False)]
    steps = drain(eng)
    assert all(s.kind == "decode" for s in steps) and len(steps) == 3
    assert steps[1].emitted == [("r0", 4, True), ("r1", 4, True), ("r2", 3, False)]
    assert steps[2].emitted == [("r2", 4, True)]
    assert not eng.has_work() and eng.kv_used == 0


def test_first_token_after_prompt_completes(kimi):
    eng = Engine(kimi, SEED, noise_sigma=0)
    eng.submit("long", 10_000, 2)
    steps = drain(eng)
    assert [s.kind for s in steps] == ["prefill", "prefill", "prefill", "decode"]
    assert [s.emitted for s in steps] == [[], [], [("long", 1, False)], [("long", 2, True)]]


def test_prefill_priority_without_mixed_chunk(kimi):
    for mixed in (False, True):
        eng = Engine(kimi, replace(SEED, enable_mixed_chunk=mixed), noise_sigma=0)
        eng.submit("a", 100, 50)
        eng.step()
        eng.submit("b", 3000, 5)
        step = eng.step()
        assert step.kind == "prefill"
        ids = {e[0] for e in step.emitted}
        assert ids == ({"a", "b"} if mixed else {"b"})


def test_max_running_requests_caps_batch(kimi):
    eng = Engine(kimi, replace(SEED, max_running_requests=4), noise_sigma=0)
    for i in range(10):
        eng.submit(f"r{i}", 50, 20)
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, eng.num_running)
    assert peak == 4


def test_kv_reservation_and_retraction(kimi):
    cfg = replace(SEED, max_total_tokens=6000, max_running_requests=64)
    eng = Engine(kimi, cfg, noise_sigma=0)
    for i in range(12):
        assert eng.submit(f"r{i}", 200, 1000) is None
    # in + 0.7*out = 900 per request -> 6 admitted at first
    eng.step()
    assert eng.num_running == 6 and eng.num_waiting == 6
    steps = []
    while eng.has_work():
        steps.append(eng.step())
        assert eng.kv_used <= eng.kv_tokens
    logs = [line for s in steps for line in s.log_lines]
    assert any("KV cache pool is full. Retract requests." in line for line in logs)
    finished = {e[0] for s in steps for e in s.emitted if e[2]}
    assert finished == {f"r{i}" for i in range(12)} and eng.kv_used == 0


def test_rejections_and_abort(kimi):
    eng = Engine(kimi, SEED, noise_sigma=0)
    assert "exceeds the maximum allowed length (" in eng.submit("big", 30_000, 8_000)  # sglang's words
    assert "context length" in eng.submit("ctx", 262_000, 1_000)
    assert eng.submit("ok", 10, 10) is None
    assert "Duplicate" in eng.submit("ok", 10, 10)
    assert eng.abort("ok") and not eng.abort("ok") and not eng.has_work()
    assert eng.submit("ok", 10, 1) is None         # id reusable once gone
    assert drain(eng)[-1].emitted == [("ok", 1, True)]


def test_infeasible_config_raises(kimi):
    with pytest.raises(InfeasibleConfig, match="startup stage"):
        Engine(kimi, replace(SEED, kt_num_gpu_experts=230))
    res = run_workload(kimi, replace(SEED, kt_threadpool_count=3), **DECODE)
    assert res.fatal and res.completed == 0 and res.output_throughput == 0


def test_workload_rejects_oversized_requests(kimi):
    res = run_workload(kimi, replace(SEED, max_total_tokens=1000), num_prompts=4,
                       input_len=900, output_len=200, warmup=False)
    assert res.completed == 0 and len(res.errors) == 4


# ----------------------------------------------------------------------------- other scenarios

@pytest.mark.parametrize("name, cfg, cliff", [
    ("deepseek-v3-8x4090-48g",
     SimConfig(tp=8, kt_weight_path="/w", kt_num_gpu_experts=100, kt_cpuinfer=80,
               kt_threadpool_count=2, chunked_prefill_size=4096, max_running_requests=32,
               max_total_tokens=40000, mem_fraction_static=0.98, enable_mixed_chunk=True), 160),
    ("qwen3-30b-a3b-1x4090",
     SimConfig(tp=1, kt_weight_path="/w", kt_num_gpu_experts=20, kt_cpuinfer=22,
               kt_threadpool_count=1, max_running_requests=16, max_total_tokens=32000,
               mem_fraction_static=0.9), 60),
])
def test_other_scenarios(name, cfg, cliff):
    scn = load_scenario(name)
    pred = predict(scn, cfg)
    assert pred.feasible, pred.reason
    assert pred.workloads["decode"].output_throughput > 1
    assert pred.workloads["prefill"].input_throughput > 50
    more = predict(scn, replace(cfg, kt_num_gpu_experts=cfg.kt_num_gpu_experts + 10))
    assert more.workloads["decode"].output_throughput > pred.workloads["decode"].output_throughput
    over = predict(scn, replace(cfg, kt_num_gpu_experts=cliff))
    assert not over.feasible and over.mem_per_gpu_gb["excess"] > 0


def test_single_numa_host_rejects_default_threadpool():
    scn = load_scenario("qwen3-30b-a3b-1x4090")
    cfg = SimConfig(tp=1, kt_weight_path="/w", kt_num_gpu_experts=20, kt_cpuinfer=22,
                    max_total_tokens=32000)
    assert not predict(scn, cfg).feasible
    assert predict(scn, replace(cfg, kt_threadpool_count=1)).feasible
