"""Noise-free step times: how long one decode step or one prefill forward takes for a
resolved configuration (CPU experts, GPU experts, attention, all-reduce)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.sim.perfmodel.config import ResolvedConfig, SimConfig, resolve
from tuner.sim.scenario import Scenario


@dataclass(frozen=True)
class CpuCapability:
    bw_gbs: float        # BW(T, P), GB/s
    ops_tops: float      # OPS(T, P), TOPS at full AMX efficiency
    kappa: float         # contention / oversubscription slowdown


def cpu_capability(scn: Scenario, rc: ResolvedConfig) -> CpuCapability:
    """perf-model §3.2."""
    cpu, t, p = scn.cpu, max(rc.cpuinfer, 1), max(rc.threadpool, 1)
    cn, n = cpu.cores_per_node, cpu.numa_nodes
    per_pool = t / p
    bw = scn.c("eta_bw") * cpu.peak_bw_gbs * min(p, n) / n * \
        (1 - math.exp(-min(per_pool, cn) / scn.c("tau")))
    ops = scn.c("pi_core_tops") * min(t, p * cn)
    c_avail = cpu.physical_cores - rc.tp
    kappa = (1 + scn.c("contention_slope") * max(0.0, min(t, cpu.physical_cores) - c_avail)) * \
        (1 + scn.c("oversub_slope") * max(0.0, per_pool - cn) / cn)
    return CpuCapability(bw, ops, kappa)


@dataclass(frozen=True)
class StepModel:
    """Precomputed per-config quantities; decode()/prefill() return noise-free seconds."""

    scn: Scenario
    rc: ResolvedConfig
    cap: CpuCapability
    captured_bs: int = 0

    @classmethod
    def build(cls, scn: Scenario, cfg: SimConfig | ResolvedConfig, captured_bs: int | None = None
              ) -> StepModel:
        rc = cfg if isinstance(cfg, ResolvedConfig) else resolve(scn, cfg)
        cap = min(rc.graph_max_bs, rc.max_running) if rc.max_running else rc.graph_max_bs
        return cls(scn, rc, cpu_capability(scn, rc), cap if captured_bs is None else captured_bs)

    @property
    def rho(self) -> float:
        e = self.scn.model.experts
        return (e - self.rc.gpu_experts) / e if self.rc.kt_on else 0.0

    def distinct(self, x: float) -> float:
        """U(x): expected distinct experts hit by x tokens (uniform routing, optional skew)."""
        m = self.scn.model
        e_eff = max(float(m.top_k), self.scn.c("routing_skew") * m.experts)
        return e_eff * (1 - (1 - m.top_k / e_eff) ** x)

    def _b_c(self) -> float:
        return self.scn.model.cpu_bytes_per_expert.get(self.rc.method, 0.0)

    def _t_fix(self, graphed: bool) -> float:
        c = self.scn.c
        base = (c("t_fix_ms") if self.rc.tp > 1 else c("t_fix_tp1_ms")) / 1e3
        return base + (0.0 if graphed else c("no_graph_ms") / 1e3)

    def decode(self, batch: int, ctx_tokens: float) -> float:
        """T_step of one decode forward (§3.3)."""
        if batch <= 0:
            return 0.0
        scn, m, c, rho = self.scn, self.scn.model, self.scn.c, self.rho
        u = self.distinct(batch)
        t_cpu = self.cap.kappa * (c("t0_ms") / 1e3 + rho * u * self._b_c() / (self.cap.bw_gbs * 1e9)) \
            if rho > 0 else 0.0
        t_gexp = (1 - rho) * u * m.gpu_bytes_per_expert / \
            (self.rc.tp * c("eta_g") * scn.gpu.bandwidth_gbs * 1e9)
        t_fix = self._t_fix(0 < batch <= self.captured_bs)
        base = max(t_cpu, t_gexp) + t_fix
        layer = base
        if self.rc.deferral > 0 and t_cpu > 0:
            omega = min(1.0, self.rc.deferral / 2)
            layer = max(t_cpu, t_gexp + t_fix) + (1 - omega) * min(t_cpu, t_fix)
            layer = max(layer, base / c("defer_cap"))
        kv_read = batch * ctx_tokens * m.kv_bytes_per_token(self.rc.tp) / \
            (c("eta_g") * scn.gpu.bandwidth_gbs * 1e9)
        dense = (m.layers_total - m.layers_moe) * t_fix
        return m.layers_moe * layer + dense + kv_read + c("t_step0_ms") / 1e3

    def prefill(self, q_tokens: int, ctx_tokens: float = 0.0) -> float:
        """T_chunk of one prefill forward of q_tokens (§3.4); ctx_tokens = mean prior context."""
        if q_tokens <= 0:
            return 0.0
        scn, m, c, rc, rho = self.scn, self.scn.model, self.scn.c, self.rc, self.rho
        g, q, f_g = rc.tp, float(q_tokens), scn.gpu.tflops * 1e12
        flops = 2 * m.params_per_expert * q * m.top_k
        if rc.layerwise_threshold and q_tokens >= rc.layerwise_threshold:
            stream = (m.experts - rc.gpu_experts) * m.gpu_bytes_per_expert / g / (scn.gpu.pcie_gbs * 1e9)
            t_moe = max(stream, flops / (g * f_g))
        else:
            t_cpu = 0.0
            if rho > 0:
                # Deviation from §3.4: the AVX branch uses a flat e_avx (with the m/(m+m½) factor a
                # 10-token prefill would take seconds); AMX never falls below it.
                mt = q * m.top_k / m.experts
                amx = scn.cpu.amx and q > m.amx_threshold
                eff = max(c("e_avx"), mt / (mt + c("m_half"))) if amx else c("e_avx")
                if not rc.method.startswith("AMXINT") and rc.method not in ("RAWINT4", "GPTQ_INT4"):
                    eff *= c("bf16_compute_factor")
                compute = flops * rho / (self.cap.ops_tops * 1e12 * eff)
                stream = rho * self.distinct(q) * self._b_c() / (self.cap.bw_gbs * 1e9)
                pcie = 2 * q * m.hidden * 2 / (scn.gpu.pcie_gbs * 1e9)
                t_cpu = self.cap.kappa * (max(compute, stream) + pcie)
            t_moe = max(t_cpu, flops * (1 - rho) / (g * f_g))
        t_comm = 0.0
        if g > 1:
            t_comm = 2 * (c("t_ar0_us") / 1e6 + 2 * (g - 1) / g * q * m.hidden * 2 /
                          (c("ar_eff") * scn.gpu.pcie_gbs * 1e9))
        eta_f = c("eta_attn") * f_g
        a1 = 2 * m.layer_params_per_gpu(g) / eta_f
        a2 = 2 * (m.num_heads / g) * (m.head_dim + m.v_head_dim) / eta_f
        t_attn = a1 * q + a2 * q * ctx_tokens
        return m.layers_moe * t_moe + m.layers_total * (t_attn + t_comm) + c("t_chunk0_s")


def decode_step_time(scn: Scenario, cfg: SimConfig, batch: int, ctx_tokens: float) -> float:
    """Noise-free seconds of one decode step of `batch` requests at `ctx_tokens` context each."""
    return StepModel.build(scn, cfg).decode(batch, ctx_tokens)


def prefill_chunk_time(scn: Scenario, cfg: SimConfig, q_tokens: int, ctx_tokens: float = 0) -> float:
    """Noise-free seconds of one prefill forward of q_tokens new tokens."""
    return StepModel.build(scn, cfg).prefill(q_tokens, ctx_tokens)
