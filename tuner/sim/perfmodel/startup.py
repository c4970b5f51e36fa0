"""Start-up of the simulated server: per-GPU memory footprint, the checks sglang-kt makes
while it loads (with its log and error lines), and the memory a forward needs at run time.

Memory is in GiB (SGLang prints GiB as "GB").
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tuner.sim.perfmodel.config import MAX_PREFILL_TOKENS, ResolvedConfig, SimConfig, resolve
from tuner.sim.scenario import Scenario

GIB = float(1 << 30)


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


_SCHEDULER_DIED = ["Scheduler hit an exception:",
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
    model = scn.model
    if cfg.tp < 1 or cfg.tp > scn.gpu.count:
        return f"--tensor-parallel-size must be in [1, {scn.gpu.count}] on this machine, got {cfg.tp}"
    if model.num_heads % cfg.tp:
        return (f"Total number of attention heads ({model.num_heads}) must be divisible by tensor "
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
    if cfg.context_length is not None and not 0 < cfg.context_length <= model.context_len:
        return (f"User-specified context_length ({cfg.context_length}) is greater than the derived "
                f"context_length ({model.context_len}).")
    return None


def _check_cpu(scn: Scenario, rc: ResolvedConfig, cfg: SimConfig) -> list[str]:
    cpu, model = scn.cpu, scn.model
    scheduler_dead = ["Rank 0 scheduler is dead. Please check if there are relevant logs."]
    if cfg.kt_cpuinfer is None:
        return ["TypeError: unsupported operand type(s) for //: 'NoneType' and 'int'"]
    if rc.method not in model.cpu_bytes_per_expert:
        return [f"ValueError: Unsupported kt_method {rc.method!r} for {model.name}; "
                f"available: {sorted(model.cpu_bytes_per_expert)}"]
    if rc.threadpool < 1 or rc.cpuinfer < rc.threadpool:
        return [f"ValueError: kt_cpuinfer ({rc.cpuinfer}) must be >= kt_threadpool_count "
                f"({rc.threadpool}) >= 1"]
    if rc.threadpool > cpu.numa_nodes:   # more pools than NUMA nodes: a native crash at launch
        return scheduler_dead + [f"Exit code: -11 (kt_threadpool_count={rc.threadpool} > {cpu.numa_nodes} "
                                 "NUMA nodes)"]
    if model.moe_intermediate % rc.threadpool:
        return [f"ValueError: moe_intermediate_size ({model.moe_intermediate}) must be divisible by "
                f"kt_threadpool_count ({rc.threadpool})"]
    host_gb = model.experts * model.layers_moe * model.cpu_bytes_per_expert[rc.method] / GIB
    if host_gb > 0.95 * cpu.ram_gib:
        return scheduler_dead + [f"Exit code: -9 (CPU expert weights {host_gb:.0f} GiB > host RAM "
                                 f"{cpu.ram_gib:.0f} GiB)"]
    return []


def _footprint(scn: Scenario, rc: ResolvedConfig, free_gib: float) -> tuple[dict[str, float], int, int]:
    """Per-GPU GiB of every startup component, the KV tokens SGLang would use (M_eff, or the
    profiled value when M is unset), and the profiled token count."""
    model, tp = scn.model, rc.tp
    experts_gib = rc.total_gpu_experts * model.gpu_bytes_per_expert / tp / GIB
    staging_gib = max(rc.chunk, 0) * model.hidden * 2 / GIB if rc.kt_on else 0.0
    slot_gib = slot_gb(scn, rc)
    weights_gib = (model.nonexpert_gb(tp) * 1e9 / GIB + experts_gib + staging_gib
                   + (slot_gib if rc.method == "MXFP4" else 0.0))
    kv_budget_gib = (free_gib - weights_gib) - free_gib * (1 - rc.mfs)
    mla_quirk = scn.c("mla_profile_quirk") > 0
    profiled = int(kv_budget_gib * GIB // model.kv_profile_bytes_per_token(tp, mla_quirk)) if kv_budget_gib > 0 else 0
    tokens = profiled if rc.max_total_tokens is None else min(rc.max_total_tokens, profiled)
    running = rc.max_running or min(max(int(tokens / rc.context_len * 512), 2048), 4096)
    captured = min(rc.graph_max_bs, running)
    mem = {
        "context": scn.c("ctx_mem_gib") + scn.gpu.reserved_by_others_gib,
        "weights": weights_gib, "experts": experts_gib,
        "kv": tokens * model.kv_bytes_per_token(tp) / GIB,
        "req_pool": running * (rc.context_len + 4) * 4 / GIB,
        "graphs": scn.c("graph_base_gib") + (scn.c("nccl_gib") if tp > 1 else 0.0)
        + captured * scn.c("graph_bytes_per_bs") * model.hidden * model.layers_total / GIB,
        "activations": activation_gb(scn, rc, max(rc.chunk, 0)),
        "slot": 0.0 if rc.method == "MXFP4" else slot_gib,
    }
    mem["total"] = sum(mem[k] for k in ("context", "weights", "kv", "req_pool", "graphs",
                                        "activations", "slot"))
    mem["capacity"] = scn.gpu.visible_memory_gib
    mem["excess"] = mem["total"] - mem["capacity"]
    return mem, tokens, profiled


def startup_check(scn: Scenario, cfg: SimConfig, *, fuzz_seed: int | None = None) -> StartupResult:
    """Replay sglang-kt's start-up in its order (argument checks, KT CPU checks, weights, KV
    profile and pool, CUDA graphs) and report the first failing stage, if any.

    mem_per_gpu_gb holds the predicted footprint (also on failure); "excess" > 0 means it
    cannot fit. fuzz_seed draws a fixed offset in +-oom_band_gib on the free memory, since a
    real server near the limit fits on one launch and not on the next; None disables the fuzz.
    """
    model, gpu = scn.model, scn.gpu
    logs: list[str] = []
    arg_error = _check_args(scn, cfg)
    if arg_error:
        return _fail("args", [f"error: {arg_error}"], logs, {"capacity": gpu.visible_memory_gib}, None)
    rc = resolve(scn, cfg)
    logs.extend(rc.notes)
    fuzz_gib = 0.0
    if fuzz_seed is not None:
        fuzz_gib = random.Random(f"oom-band/{fuzz_seed}").uniform(-1, 1) * scn.c("oom_band_gib")
    free_gib = gpu.visible_memory_gib - scn.c("ctx_mem_gib") - gpu.reserved_by_others_gib + fuzz_gib
    mem, tokens, profiled = _footprint(scn, rc, free_gib)
    if rc.placement_error:  # sglang-kt reads the frequency file while it builds the expert masks
        return _fail("weights", [rc.placement_error] + _SCHEDULER_DIED, logs, mem, rc)
    if rc.kt_on:
        cpu_err = _check_cpu(scn, rc, cfg)
        if cpu_err:
            return _fail("cpu", cpu_err, logs, mem, rc)
        if rc.chunk <= 0:
            return _fail("weights", ["RuntimeError: Trying to create tensor with negative dimension "
                                     f"{rc.chunk * model.hidden}: [{rc.chunk}, {model.hidden}]"] + _SCHEDULER_DIED,
                         logs, mem, rc)
    weights_gib = mem["weights"]
    if weights_gib > free_gib:   # experts load layer by layer: the first layer that does not fit fails
        layer_gib = max(mem["experts"] / model.layers_moe, 0.01)
        base_gib = weights_gib - mem["experts"]
        free = (free_gib - base_gib if base_gib > free_gib
                else free_gib - base_gib - layer_gib * math.floor((free_gib - base_gib) / layer_gib))
        return _fail("weights", [_cuda_oom(layer_gib, scn, free)] + _SCHEDULER_DIED, logs, mem, rc)
    logs.append(f"Load weight end. elapsed={2 * weights_gib:.2f} s, type={model.name}, dtype=torch.bfloat16, "
                f"avail mem={free_gib - weights_gib:.2f} GB, mem usage={weights_gib:.2f} GB.")
    if rc.max_total_tokens is not None and rc.max_total_tokens > profiled > 0:
        logs.append(f"max_total_tokens={rc.max_total_tokens} is larger than the profiled value "
                    f"{profiled}. Use the profiled value instead.")
    if tokens <= 0:
        return _fail("kv_profile", ["RuntimeError: Not enough memory. Please try to increase "
                                    "--mem-fraction-static. Current value: "
                                    f"self.server_args.mem_fraction_static={rc.mfs}"], logs, mem, rc)
    avail = free_gib - weights_gib
    if mem["kv"] + mem["req_pool"] > avail:
        alloc, free = mem["kv"] / model.layers_total, avail - mem["req_pool"]   # one buffer per layer
        free = free - alloc * math.floor(free / alloc) if free > 0 else avail
        return _fail("kv_alloc", [_cuda_oom(alloc, scn, free)] + _SCHEDULER_DIED, logs, mem, rc, tokens)
    avail -= mem["kv"] + mem["req_pool"]
    if model.attention == "mla":
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
    host_gb = model.experts * model.layers_moe * model.cpu_bytes_per_expert.get(rc.method, 0.0) / 1e9
    load_s = scn.c("load_base_s") + (host_gb / scn.c("load_gbs") if rc.kt_on else 0.0) + 2 * weights_gib
    return StartupResult(True, None, logs, [], tokens, mem, running, rc.chunk, avail,
                         mem["activations"] + mem["slot"] <= avail, load_s, rc)

