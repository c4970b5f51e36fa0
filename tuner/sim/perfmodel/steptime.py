"""Noise-free step times: how long one decode step or one prefill forward takes for a
resolved configuration (CPU experts, GPU experts, attention, all-reduce)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.sim.perfmodel.config import ResolvedConfig, SimConfig, resolve
from tuner.sim.perfmodel.placement import Routing
from tuner.sim.scenario import Scenario

#: KT_RAWINT4_BACKEND → (prefill compute factor, decode bandwidth factor) relative to the AMX
#: kernel [A]: the blocked AMX layout streams a little better and computes a little worse; the
#: AVX kernels run prefill at the AVX efficiency (avx2 at 60 % of it). Unset = amx.
RAWINT4_BACKENDS: dict[str, tuple[float, float]] = {
    "amx": (1.0, 1.0), "amx_blocked": (0.9, 1.08), "avxvnni": (0.0, 1.0), "avx2": (0.0, 0.9),
}
_AVX2_SHARE = 0.6


@dataclass(frozen=True)
class CpuCapability:
    bw_gbs: float        # BW(T, P), GB/s
    ops_tops: float      # OPS(T, P), TOPS at full AMX efficiency
    slowdown: float      # contention / oversubscription factor on CPU time


def cpu_capability(scn: Scenario, rc: ResolvedConfig) -> CpuCapability:
    """What kt-cpuinfer threads in kt-threadpool-count pools give the CPU experts: DRAM bandwidth
    (at most one pool per NUMA node, saturating with threads per node), AMX TOP/s, and a slowdown
    for threads beyond the cores the GPU ranks leave free and for more threads than a node has."""
    cpu, threads, pools = scn.cpu, max(rc.cpuinfer, 1), max(rc.threadpool, 1)
    cores_per_node, nodes = cpu.cores_per_node, cpu.numa_nodes
    threads_per_pool = threads / pools
    bandwidth_gbs = scn.c("eta_bw") * cpu.peak_bw_gbs * min(pools, nodes) / nodes * \
        (1 - math.exp(-min(threads_per_pool, cores_per_node) / scn.c("tau")))
    tops = scn.c("pi_core_tops") * min(threads, pools * cores_per_node)
    free_cores = cpu.physical_cores - rc.tp
    slowdown = (1 + scn.c("contention_slope") * max(0.0, min(threads, cpu.physical_cores) - free_cores)) * \
        (1 + scn.c("oversub_slope") * max(0.0, threads_per_pool - cores_per_node) / cores_per_node)
    return CpuCapability(bandwidth_gbs, tops, slowdown)


@dataclass(frozen=True)
class StepModel:
    """Precomputed per-config quantities; decode()/prefill() return noise-free seconds."""

    scn: Scenario
    rc: ResolvedConfig
    capability: CpuCapability
    captured_bs: int = 0
    # True once dynamic expert update has re-picked the GPU experts (after a layerwise prefill)
    updated: bool = False

    @classmethod
    def build(cls, scn: Scenario, cfg: SimConfig | ResolvedConfig, captured_bs: int | None = None,
              *, updated: bool = False) -> StepModel:
        rc = cfg if isinstance(cfg, ResolvedConfig) else resolve(scn, cfg)
        captured = min(rc.graph_max_bs, rc.max_running) if rc.max_running else rc.graph_max_bs
        return cls(scn, rc, cpu_capability(scn, rc), captured if captured_bs is None else captured_bs,
                   updated=updated and rc.updated_routing is not None)

    @property
    def routing(self) -> Routing | None:
        return self.rc.updated_routing if self.updated else self.rc.routing

    def _backend(self) -> tuple[float, float]:
        return RAWINT4_BACKENDS.get(self.rc.cpu_backend or "amx", (1.0, 1.0))

    def _cpu_experts_hit(self, x: float) -> float:
        routing = self.routing
        if routing is None:
            return self.cpu_expert_share * self.distinct(x)
        return routing.distinct(x, on_cpu=True)

    def _gpu_experts_hit(self, x: float) -> float:
        routing = self.routing
        if routing is None:
            return (1 - self.cpu_expert_share) * self.distinct(x)
        return routing.distinct(x, on_cpu=False)

    @property
    def cpu_token_share(self) -> float:
        """Share of routed tokens the CPU experts compute."""
        routing = self.routing
        if routing is None or not self.rc.kt_on:
            return self.cpu_expert_share
        return routing.cpu_token_share()

    @property
    def cpu_expert_share(self) -> float:
        e = self.scn.model.experts
        return (e - self.rc.gpu_experts) / e if self.rc.kt_on else 0.0

    def distinct(self, x: float) -> float:
        """U(x): expected distinct experts hit by x tokens (uniform routing, optional skew)."""
        model = self.scn.model
        effective_experts = max(float(model.top_k), self.scn.c("routing_skew") * model.experts)
        return effective_experts * (1 - (1 - model.top_k / effective_experts) ** x)

    def _cpu_bytes_per_expert(self) -> float:
        return self.scn.model.cpu_bytes_per_expert.get(self.rc.method, 0.0)

    def _fixed_layer_s(self, graphed: bool) -> float:
        const = self.scn.c
        base = (const("t_fix_ms") if self.rc.tp > 1 else const("t_fix_tp1_ms")) / 1e3
        return base + (0.0 if graphed else const("no_graph_ms") / 1e3)

    def cpu_decode_s(self, batch: int) -> float:
        """Seconds of one MoE layer's CPU experts in a decode step of `batch` tokens: the submit
        overhead plus the weights of the experts hit, streamed at the pools' bandwidth."""
        bw_gbs = self.capability.bw_gbs * self._backend()[1]
        return self.capability.slowdown * (self.scn.c("t0_ms") / 1e3 + self._cpu_experts_hit(batch)
                                           * self._cpu_bytes_per_expert() / (bw_gbs * 1e9))

    def cpu_prefill_s(self, q_tokens: int) -> float:
        """Seconds of one MoE layer's CPU experts on a prefill chunk of q_tokens (no PCIe):
        the slower of their compute and their weight streaming."""
        scn, model, const, rc = self.scn, self.scn.model, self.scn.c, self.rc
        tokens = float(q_tokens)
        # Below the AMX threshold the efficiency is a flat e_avx: the m / (m + m_half) curve would
        # make a 10-token prefill take seconds. AMX never falls below it.
        tokens_per_expert = tokens * model.top_k / model.experts
        compute_factor, bw_factor = self._backend()
        use_amx = scn.cpu.amx and tokens > model.amx_threshold and compute_factor > 0
        efficiency = (max(const("e_avx"), tokens_per_expert / (tokens_per_expert + const("m_half")))
                      * compute_factor if use_amx else const("e_avx"))
        if rc.cpu_backend == "avx2":
            efficiency *= _AVX2_SHARE
        if not rc.method.startswith("AMXINT") and rc.method not in ("RAWINT4", "GPTQ_INT4"):
            efficiency *= const("bf16_compute_factor")
        expert_flops = 2 * model.params_per_expert * tokens * model.top_k
        compute_s = expert_flops * self.cpu_token_share / (self.capability.ops_tops * 1e12 * efficiency)
        stream_s = (self._cpu_experts_hit(tokens) * self._cpu_bytes_per_expert()
                    / (self.capability.bw_gbs * bw_factor * 1e9))
        return self.capability.slowdown * max(compute_s, stream_s)

    def decode(self, batch: int, ctx_tokens: float) -> float:
        """Seconds of one decode forward of `batch` requests with `ctx_tokens` context each: per MoE
        layer the slower of the CPU and GPU experts plus a fixed GPU cost (deferral overlaps part of
        the CPU time with it), the fixed cost of the dense layers, the KV-cache read, and a per-step
        overhead (scheduler, sampling, lm_head)."""
        if batch <= 0:
            return 0.0
        scn, model, const, cpu_share = self.scn, self.scn.model, self.scn.c, self.cpu_expert_share
        cpu_s = self.cpu_decode_s(batch) if cpu_share > 0 else 0.0
        gpu_experts_s = self._gpu_experts_hit(batch) * model.gpu_bytes_per_expert / \
            (self.rc.tp * const("eta_g") * scn.gpu.bandwidth_gbs * 1e9)
        fixed_s = self._fixed_layer_s(0 < batch <= self.captured_bs)
        base_s = max(cpu_s, gpu_experts_s) + fixed_s
        layer_s = base_s
        if self.rc.deferral > 0 and cpu_s > 0:
            overlap = min(1.0, self.rc.deferral / 2)
            layer_s = max(cpu_s, gpu_experts_s + fixed_s) + (1 - overlap) * min(cpu_s, fixed_s)
            layer_s = max(layer_s, base_s / const("defer_cap"))
        kv_read_s = batch * ctx_tokens * model.kv_bytes_per_token(self.rc.tp) / \
            (const("eta_g") * scn.gpu.bandwidth_gbs * 1e9)
        dense_s = (model.layers_total - model.layers_moe) * fixed_s
        return model.layers_moe * layer_s + dense_s + kv_read_s + const("t_step0_ms") / 1e3

    def prefill(self, q_tokens: int, ctx_tokens: float = 0.0) -> float:
        """Seconds of one prefill forward of q_tokens new tokens (ctx_tokens: mean prior context):
        per MoE layer the CPU experts (compute or weight streaming, plus the PCIe round trip of the
        activations) against the GPU experts, or above the layerwise threshold the CPU experts streamed
        to the GPU; attention linear in the tokens and in tokens x context; TP all-reduces."""
        if q_tokens <= 0:
            return 0.0
        scn, model, const, rc, cpu_share = self.scn, self.scn.model, self.scn.c, self.rc, self.cpu_expert_share
        tp, tokens, gpu_flops = rc.tp, float(q_tokens), scn.gpu.tflops * 1e12
        expert_flops = 2 * model.params_per_expert * tokens * model.top_k
        cpu_tokens = self.cpu_token_share
        if rc.layerwise_threshold and q_tokens >= rc.layerwise_threshold:
            stream_s = (model.experts - rc.gpu_experts) * model.gpu_bytes_per_expert / tp / (scn.gpu.pcie_gbs * 1e9)
            moe_s = max(stream_s, expert_flops / (tp * gpu_flops))
            if rc.updated_routing is not None:  # dynamic update: re-pick and copy the GPU experts
                moe_s += const("dyn_update_ms") / 1e3 + rc.gpu_experts * model.gpu_bytes_per_expert / \
                    (tp * const("eta_g") * scn.gpu.bandwidth_gbs * 1e9)
        else:
            cpu_s = 0.0
            if cpu_share > 0:
                pcie_s = 2 * tokens * model.hidden * 2 / (scn.gpu.pcie_gbs * 1e9)
                cpu_s = self.cpu_prefill_s(q_tokens) + self.capability.slowdown * pcie_s
            moe_s = max(cpu_s, expert_flops * (1 - cpu_tokens) / (tp * gpu_flops))
        allreduce_s = 0.0
        if tp > 1:
            allreduce_s = 2 * (const("t_ar0_us") / 1e6 + 2 * (tp - 1) / tp * tokens * model.hidden * 2 /
                               (const("ar_eff") * scn.gpu.pcie_gbs * 1e9))
        attn_flops = const("eta_attn") * gpu_flops
        linear_s_per_token = 2 * model.layer_params_per_gpu(tp) / attn_flops
        attn_s_per_token_pair = 2 * (model.num_heads / tp) * (model.head_dim + model.v_head_dim) / attn_flops
        attn_s = linear_s_per_token * tokens + attn_s_per_token_pair * tokens * ctx_tokens
        return model.layers_moe * moe_s + model.layers_total * (attn_s + allreduce_s) + const("t_chunk0_s")


def decode_step_time(scn: Scenario, cfg: SimConfig, batch: int, ctx_tokens: float) -> float:
    """Noise-free seconds of one decode step of `batch` requests at `ctx_tokens` context each."""
    return StepModel.build(scn, cfg).decode(batch, ctx_tokens)


def prefill_chunk_time(scn: Scenario, cfg: SimConfig, q_tokens: int, ctx_tokens: float = 0) -> float:
    """Noise-free seconds of one prefill forward of q_tokens new tokens."""
    return StepModel.build(scn, cfg).prefill(q_tokens, ctx_tokens)
