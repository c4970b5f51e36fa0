"""Analytical model of an sglang-kt server (perf-model.md §3): flag defaults, startup memory
checks with SGLang-like log/error lines, and noise-free decode/prefill step times.

Memory is in GiB (SGLang prints GiB as "GB"). A test double: realistic shape, unvalidated numbers.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tuner.sim.scenario import Scenario

GIB = float(1 << 30)
MAX_PREFILL_TOKENS = 16384
#: kt-methods that can stream their weights to the GPU for layerwise prefill (facts §2).
NATIVE_KT_METHODS = frozenset({"RAWINT4", "FP8", "FP8_PERCHANNEL", "BF16", "MXFP4", "GPTQ_INT4"})


@dataclass(frozen=True)
class SimConfig:
    """The launch_server flags the simulator understands (None = flag absent)."""

    tp: int = 1
    kt_weight_path: str | None = None
    kt_num_gpu_experts: int | None = None
    kt_gpu_experts_ratio: float | None = None
    kt_cpuinfer: int | None = None
    kt_threadpool_count: int = 2
    kt_method: str = "AMXINT4"
    kt_max_deferred_experts_per_token: int = 0
    kt_gpu_prefill_token_threshold: int = 0
    chunked_prefill_size: int | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    cuda_graph_max_bs: int | None = None
    enable_mixed_chunk: bool = False
    disable_cuda_graph: bool = False
    context_length: int | None = None

    def resolved(self, scn: Scenario) -> ResolvedConfig:
        return resolve(scn, self)


@dataclass(frozen=True)
class ResolvedConfig:
    """SimConfig after SGLang's defaults and KT's placement rules."""

    tp: int
    kt_on: bool
    gpu_experts: float            # per MoE layer (mean when set by ratio)
    total_gpu_experts: int
    cpuinfer: int
    threadpool: int
    method: str
    deferral: int
    layerwise_threshold: int      # 0: layerwise GPU prefill off
    chunk: int
    chunk_flag: int | None
    max_running: int | None       # None: derived from KV capacity at startup
    max_total_tokens: int | None
    mfs: float
    graph_max_bs: int             # configured --cuda-graph-max-bs (0 when graphs are disabled)
    mixed_chunk: bool
    context_len: int
    notes: tuple[str, ...] = ()


def _bucket(v_gib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) defaults by visible VRAM (facts §3)."""
    chunk = 2048 if v_gib < 35 else 4096 if v_gib < 60 else 8192 if v_gib < 160 else 16384
    small = tp < 4
    bs = 8 if v_gib < 20 else (24 if small else 80) if v_gib < 35 else \
        (32 if small else 160) if v_gib < 60 else (256 if small else 512)
    return chunk, bs


def resolve(scn: Scenario, cfg: SimConfig) -> ResolvedConfig:
    m, notes = scn.model, []
    chunk_default, bs_default = _bucket(scn.gpu.visible_memory_gib, cfg.tp)
    chunk = chunk_default if cfg.chunked_prefill_size is None else cfg.chunked_prefill_size
    reserve_chunk = max(chunk, 2048)
    if chunk <= 0 and cfg.kt_weight_path is None:
        chunk = max(MAX_PREFILL_TOKENS, m.context_len)   # chunking disabled
    kt_on = cfg.kt_weight_path is not None
    if kt_on and cfg.kt_num_gpu_experts is None and cfg.kt_gpu_experts_ratio is None:
        notes.append("Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.")
        kt_on = False
    if not kt_on:
        n, total = float(m.experts), m.experts * m.layers_moe
    elif cfg.kt_gpu_experts_ratio is not None:
        total = int(m.experts * m.layers_moe * min(1.0, max(0.0, cfg.kt_gpu_experts_ratio)))
        n = total / m.layers_moe
    else:
        n = float(min(m.experts, max(0, cfg.kt_num_gpu_experts or 0)))
        total = int(n) * m.layers_moe
    if kt_on:
        notes.append(f"Using kt_num_gpu_experts={round(n)} per layer, total GPU experts: {total}")
    bs = cfg.cuda_graph_max_bs if cfg.cuda_graph_max_bs is not None else bs_default
    mfs = cfg.mem_fraction_static
    if mfs is None:   # SGLang auto: (VRAM - reserve) / VRAM
        v_mib = scn.gpu.visible_memory_gib * 1024
        reserve = 512 + 1.5 * reserve_chunk + 2 * bs + 1024 * cfg.tp / 8
        if scn.gpu.visible_memory_gib > 60:
            reserve = max(reserve, 10 * 1024)
        mfs = round((v_mib - reserve) / v_mib, 3)
    method = (cfg.kt_method or "AMXINT4").upper()
    thr = cfg.kt_gpu_prefill_token_threshold or 0
    if kt_on and thr > 0 and method not in NATIVE_KT_METHODS:
        notes.append(f"kt_gpu_prefill_token_threshold={thr} ignored: kt_method {method} is not native")
        thr = 0
    return ResolvedConfig(
        tp=cfg.tp, kt_on=kt_on, gpu_experts=n, total_gpu_experts=total,
        cpuinfer=cfg.kt_cpuinfer or 0, method=method,
        threadpool=2 if cfg.kt_threadpool_count is None else cfg.kt_threadpool_count,
        deferral=max(0, cfg.kt_max_deferred_experts_per_token or 0) if kt_on else 0,
        layerwise_threshold=thr if (kt_on and 0 < thr <= chunk) else 0,
        chunk=chunk, chunk_flag=cfg.chunked_prefill_size, max_running=cfg.max_running_requests,
        max_total_tokens=cfg.max_total_tokens, mfs=mfs,
        graph_max_bs=0 if cfg.disable_cuda_graph else bs, mixed_chunk=cfg.enable_mixed_chunk,
        context_len=cfg.context_length or m.context_len, notes=tuple(notes))


# ----------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class StartupResult:
    ok: bool
    stage: str | None
    log_lines: list[str]
    error_lines: list[str]
    kv_tokens: int
    mem_per_gpu_gb: dict[str, float]
    max_running_requests: int = 0
    chunked_prefill_size: int = 0
    runtime_free_gb: float = 0.0      # free GiB per GPU after startup, for activations + slot
    runtime_ok: bool = False          # a full chunk's activations (+ slot) also fit
    load_time_s: float = 0.0
    config: ResolvedConfig | None = None


def _cuda_oom(alloc_gib: float, scn: Scenario, free_gib: float) -> str:
    return (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {alloc_gib:.2f} GiB. "
            f"GPU 0 has a total capacity of {scn.gpu.visible_memory_gib:.2f} GiB of which "
            f"{max(0.0, free_gib) * 1024:.2f} MiB is free.")


_SCHED_DEAD = ["Scheduler hit an exception:",
               "Received sigquit from a child process. It usually means the child failed."]


def activation_gb(scn: Scenario, rc: ResolvedConfig, q_tokens: int) -> float:
    """alpha * Q: activation GiB of a forward of q_tokens (alpha = H*(rep + shard/TP) bytes)."""
    per_token = scn.model.hidden * (scn.c("act_rep_bytes") + scn.c("act_shard_bytes") / rc.tp)
    return per_token * q_tokens / GIB


def slot_gb(scn: Scenario, rc: ResolvedConfig) -> float:
    """One full MoE layer for layerwise GPU prefill (E * b_g / TP)."""
    if not rc.layerwise_threshold:
        return 0.0
    return scn.model.experts * scn.model.gpu_bytes_per_expert / rc.tp / GIB


def runtime_extra_gb(scn: Scenario, cfg: SimConfig | ResolvedConfig, q_tokens: int) -> float:
    """GiB per GPU a forward of q_tokens needs beyond the startup footprint."""
    rc = cfg if isinstance(cfg, ResolvedConfig) else resolve(scn, cfg)
    slot = slot_gb(scn, rc) if (rc.layerwise_threshold and q_tokens >= rc.layerwise_threshold
                                and rc.method != "MXFP4") else 0.0
    return activation_gb(scn, rc, q_tokens) + slot


def runtime_oom(scn: Scenario, cfg: SimConfig | ResolvedConfig, q_tokens: int,
                startup: StartupResult) -> str | None:
    """The CUDA OOM text if a forward of q_tokens does not fit next to the startup footprint."""
    need = runtime_extra_gb(scn, cfg, q_tokens)
    if need <= startup.runtime_free_gb:
        return None
    return _cuda_oom(need, scn, startup.runtime_free_gb)


def _fail(stage: str, errors: list[str], logs: list[str], mem: dict[str, float],
          rc: ResolvedConfig | None, kv: int = 0) -> StartupResult:
    return StartupResult(False, stage, logs, errors, kv, mem, config=rc,
                         chunked_prefill_size=rc.chunk if rc else 0)


def _check_args(scn: Scenario, cfg: SimConfig) -> str | None:
    m = scn.model
    if cfg.tp < 1 or cfg.tp > scn.gpu.count:
        return f"--tensor-parallel-size must be in [1, {scn.gpu.count}] on this machine, got {cfg.tp}"
    if m.num_heads % cfg.tp:
        return (f"Total number of attention heads ({m.num_heads}) must be divisible by tensor "
                f"parallel size ({cfg.tp}).")
    if cfg.mem_fraction_static is not None and not 0 < cfg.mem_fraction_static <= 1:
        return f"--mem-fraction-static must be in (0, 1], got {cfg.mem_fraction_static}"
    if cfg.kt_gpu_experts_ratio is not None and not 0 <= cfg.kt_gpu_experts_ratio <= 1:
        return "--kt-gpu-experts-ratio must be in [0, 1]"
    for flag, value in (("max-running-requests", cfg.max_running_requests),
                        ("max-total-tokens", cfg.max_total_tokens),
                        ("cuda-graph-max-bs", cfg.cuda_graph_max_bs)):
        if value is not None and value < 1:
            return f"--{flag} must be >= 1, got {value}"
    if cfg.context_length is not None and not 0 < cfg.context_length <= m.context_len:
        return (f"User-specified context_length ({cfg.context_length}) is greater than the derived "
                f"context_length ({m.context_len}).")
    return None


def _check_cpu(scn: Scenario, rc: ResolvedConfig, cfg: SimConfig) -> list[str]:
    cpu, m = scn.cpu, scn.model
    dead = ["Rank 0 scheduler is dead. Please check if there are relevant logs."]
    if cfg.kt_cpuinfer is None:
        return ["TypeError: unsupported operand type(s) for //: 'NoneType' and 'int'"]
    if rc.method not in m.cpu_bytes_per_expert:
        return [f"ValueError: Unsupported kt_method {rc.method!r} for {m.name}; "
                f"available: {sorted(m.cpu_bytes_per_expert)}"]
    if rc.threadpool < 1 or rc.cpuinfer < rc.threadpool:
        return [f"ValueError: kt_cpuinfer ({rc.cpuinfer}) must be >= kt_threadpool_count "
                f"({rc.threadpool}) >= 1"]
    if rc.threadpool > cpu.numa_nodes:   # perf-model §3.2: treated as a launch failure
        return dead + [f"Exit code: -11 (kt_threadpool_count={rc.threadpool} > {cpu.numa_nodes} "
                       "NUMA nodes)"]
    if m.moe_intermediate % rc.threadpool:
        return [f"ValueError: moe_intermediate_size ({m.moe_intermediate}) must be divisible by "
                f"kt_threadpool_count ({rc.threadpool})"]
    host_gb = m.experts * m.layers_moe * m.cpu_bytes_per_expert[rc.method] / GIB
    if host_gb > 0.95 * cpu.ram_gib:
        return dead + [f"Exit code: -9 (CPU expert weights {host_gb:.0f} GiB > host RAM "
                       f"{cpu.ram_gib:.0f} GiB)"]
    return []


def _footprint(scn: Scenario, rc: ResolvedConfig, f0: float) -> tuple[dict[str, float], int, int]:
    """Per-GPU GiB of every startup component, the KV tokens SGLang would use (M_eff, or the
    profiled value when M is unset), and the profiled token count."""
    m, g = scn.model, rc.tp
    experts = rc.total_gpu_experts * m.gpu_bytes_per_expert / g / GIB
    staging = max(rc.chunk, 0) * m.hidden * 2 / GIB if rc.kt_on else 0.0
    lazy_slot = slot_gb(scn, rc)
    w = m.nonexpert_gb(g) * 1e9 / GIB + experts + staging + (lazy_slot if rc.method == "MXFP4" else 0.0)
    rest = (f0 - w) - f0 * (1 - rc.mfs)
    quirk = scn.c("mla_profile_quirk") > 0
    profiled = int(rest * GIB // m.kv_profile_bytes_per_token(g, quirk)) if rest > 0 else 0
    tokens = profiled if rc.max_total_tokens is None else min(rc.max_total_tokens, profiled)
    running = rc.max_running or min(max(int(tokens / rc.context_len * 512), 2048), 4096)
    captured = min(rc.graph_max_bs, running)
    mem = {
        "context": scn.c("ctx_mem_gib") + scn.gpu.reserved_by_others_gib,
        "weights": w, "experts": experts,
        "kv": tokens * m.kv_bytes_per_token(g) / GIB,
        "req_pool": running * (rc.context_len + 4) * 4 / GIB,
        "graphs": scn.c("graph_base_gib") + (scn.c("nccl_gib") if g > 1 else 0.0)
        + captured * scn.c("graph_bytes_per_bs") * m.hidden * m.layers_total / GIB,
        "activations": activation_gb(scn, rc, max(rc.chunk, 0)),
        "slot": 0.0 if rc.method == "MXFP4" else lazy_slot,
    }
    mem["total"] = sum(mem[k] for k in ("context", "weights", "kv", "req_pool", "graphs",
                                        "activations", "slot"))
    mem["capacity"] = scn.gpu.visible_memory_gib
    mem["excess"] = mem["total"] - mem["capacity"]
    return mem, tokens, profiled


def startup_check(scn: Scenario, cfg: SimConfig, *, fuzz_seed: int | None = None) -> StartupResult:
    """Replay sglang-kt startup (facts §4.1) and report the first failing stage, if any.

    mem_per_gpu_gb holds the predicted footprint (also on failure); "excess" > 0 means it
    cannot fit. fuzz_seed draws a fixed offset in +-oom_band_gib on the free memory
    (perf-model §3.7); None disables the fuzz.
    """
    m, gpu, logs = scn.model, scn.gpu, []
    bad = _check_args(scn, cfg)
    if bad:
        return _fail("args", [f"error: {bad}"], logs, {"capacity": gpu.visible_memory_gib}, None)
    rc = resolve(scn, cfg)
    logs.extend(rc.notes)
    fuzz = 0.0
    if fuzz_seed is not None:
        fuzz = random.Random(f"oom-band/{fuzz_seed}").uniform(-1, 1) * scn.c("oom_band_gib")
    f0 = gpu.visible_memory_gib - scn.c("ctx_mem_gib") - gpu.reserved_by_others_gib + fuzz
    mem, tokens, profiled = _footprint(scn, rc, f0)
    if rc.kt_on:
        cpu_err = _check_cpu(scn, rc, cfg)
        if cpu_err:
            return _fail("cpu", cpu_err, logs, mem, rc)
        if rc.chunk <= 0:
            return _fail("weights", ["RuntimeError: Trying to create tensor with negative dimension "
                                     f"{rc.chunk * m.hidden}: [{rc.chunk}, {m.hidden}]"] + _SCHED_DEAD,
                         logs, mem, rc)
    w = mem["weights"]
    if w > f0:   # experts load layer by layer: the first layer that does not fit fails
        per_layer = max(mem["experts"] / m.layers_moe, 0.01)
        base = w - mem["experts"]
        free = f0 - base if base > f0 else f0 - base - per_layer * math.floor((f0 - base) / per_layer)
        return _fail("weights", [_cuda_oom(per_layer, scn, free)] + _SCHED_DEAD, logs, mem, rc)
    logs.append(f"Load weight end. type={m.name}, dtype=torch.bfloat16, avail mem={f0 - w:.2f} GB, "
                f"mem usage={w:.2f} GB.")
    if rc.max_total_tokens is not None and rc.max_total_tokens > profiled > 0:
        logs.append(f"max_total_tokens={rc.max_total_tokens} is larger than the profiled value "
                    f"{profiled}. Use the profiled value instead.")
    if tokens <= 0:
        return _fail("kv_profile", ["RuntimeError: Not enough memory. Please try to increase "
                                    "--mem-fraction-static. Current value: "
                                    f"self.server_args.mem_fraction_static={rc.mfs}"], logs, mem, rc)
    avail = f0 - w
    if mem["kv"] + mem["req_pool"] > avail:
        alloc, free = mem["kv"] / m.layers_total, avail - mem["req_pool"]   # one buffer per layer
        free = free - alloc * math.floor(free / alloc) if free > 0 else avail
        return _fail("kv_alloc", [_cuda_oom(alloc, scn, free)] + _SCHED_DEAD, logs, mem, rc, tokens)
    avail -= mem["kv"] + mem["req_pool"]
    if m.attention == "mla":
        logs.append(f"KV Cache is allocated. #tokens: {tokens}, KV size: {mem['kv']:.2f} GB")
    else:
        logs.append(f"KV Cache is allocated. #tokens: {tokens}, K size: {mem['kv'] / 2:.2f} GB, "
                    f"V size: {mem['kv'] / 2:.2f} GB")
    logs.append(f"Memory pool end. avail mem={avail:.2f} GB")
    running = rc.max_running or min(max(int(tokens / rc.context_len * 512), 2048), 4096)
    captured = min(rc.graph_max_bs, running)
    if rc.graph_max_bs:
        logs.append(f"Capture cuda graph begin. This can take up to several minutes. "
                    f"avail mem={avail:.2f} GB")
    if mem["graphs"] > avail:
        oom = _cuda_oom(mem["graphs"], scn, avail)
        if not rc.graph_max_bs:
            return _fail("warmup", ["Initialization failed. warmup error: " + oom], logs, mem, rc, tokens)
        return _fail("cuda_graph", [
            "Capture cuda graph failed: " + oom, "Possible solutions:",
            "1. set --mem-fraction-static to a smaller value (e.g., 0.8 or 0.7)",
            "2. set --cuda-graph-max-bs to a smaller value (e.g., 16)",
            "3. disable torch compile by not using --enable-torch-compile",
            "4. disable CUDA graph by --disable-cuda-graph. (Not recommended. Huge performance loss)",
        ], logs, mem, rc, tokens)
    avail -= mem["graphs"]
    if rc.graph_max_bs:
        logs.append(f"Capture cuda graph end. Time elapsed: {5 + 0.3 * captured:.2f} s. "
                    f"mem usage={mem['graphs']:.2f} GB. avail mem={avail:.2f} GB.")
    logs.append(f"max_total_num_tokens={tokens}, chunked_prefill_size={rc.chunk}, "
                f"max_prefill_tokens={MAX_PREFILL_TOKENS}, max_running_requests={running}, "
                f"context_len={rc.context_len}, available_gpu_mem={avail:.2f} GB")
    host_gb = m.experts * m.layers_moe * m.cpu_bytes_per_expert.get(rc.method, 0.0) / 1e9
    load_s = scn.c("load_base_s") + (host_gb / scn.c("load_gbs") if rc.kt_on else 0.0) + 2 * w
    return StartupResult(True, None, logs, [], tokens, mem, running, rc.chunk, avail,
                         mem["activations"] + mem["slot"] <= avail, load_s, rc)


# ----------------------------------------------------------------------------- timing

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
