"""`kttune init`: a search space for one model on one machine (this one, or one described by
`--gpus`/`--cpu`), with its ranges taken from the feasibility model instead of guessed:
kt-num-gpu-experts up to the largest count that fits, kt-cpuinfer around physical cores −
GPUs, kt-threadpool-count up to the NUMA nodes. The seed deployment's two workloads and
objective, and the interpreters found on PATH that have sglang."""
from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuner.config import AUTO, parse_space
from tuner.errors import ConfigError
from tuner.feasibility import FeasibilityGate, FeasibilityReport, max_gpu_experts
from tuner.machine import Hardware, load_model_sizes, resolve_hardware
from tuner.preflight.doctor import run_process

# The seed deployment's workloads, objective and the knobs it tuned by hand (sglang-kt's
# Kimi-K2-Thinking guide): a long-prompt prefill job and a short-prompt decode job of 37 requests.
SEED_WORKLOADS = {"prefill": {"num_prompts": 37, "input_len": 1024, "output_len": 1},
                  "decode": {"num_prompts": 37, "input_len": 10, "output_len": 512}}
SEED_OBJECTIVE = [{"workload": "decode", "metric": "output_throughput", "direction": "maximize"}]
CHUNK_CHOICES = [1024, 2048, 4096, 8192]
SEED_CHUNK = 4096
RUNNING_RANGE = {"low": 8, "high": 64}
SEED_RUNNING = 37
# Grid points of kt-num-gpu-experts: each costs a launch to tell apart, and neighbours a few
# experts apart differ by less than the run-to-run noise.
EXPERT_GRID_POINTS = 32
CPUINFER_GRID_POINTS = 12

_GPUS = re.compile(r"^\s*(\d+)\s*[x×]\s*(.+?)(?:[\s:@-]+(\d+(?:\.\d+)?)\s*(GiB|GB|G|MiB|MB|M))?\s*$", re.IGNORECASE)
_FIND = "import importlib.util as u, sys; print(all(u.find_spec(m) is not None for m in sys.argv[1:]))"
_CPU = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*c?\s*$", re.IGNORECASE)


def parse_gpus(text: str) -> dict[str, Any]:
    """`--gpus "8x L20-48G"` → the space's `hardware.gpu` block. Memory in GiB (G, GB, GiB) or
    MiB (M, MB, MiB; nvidia-smi's total, the precise figure)."""
    m = _GPUS.match(text)
    if not m or int(m[1]) < 1:
        raise ConfigError(f"--gpus: {text!r} is not COUNTx NAME-MEMORY; e.g. --gpus \"8x L20-48G\" or "
                          "--gpus \"4x H100-81559MiB\"")
    block: dict[str, Any] = {"count": int(m[1]), "name": m[2].strip()}
    if m[3] is not None:
        unit = m[4].lower()
        block["memory_mib" if unit.startswith("m") else "memory_gib"] = float(m[3]) if "." in m[3] else int(m[3])
    return block


def parse_cpu(text: str, numa_nodes: int | None, amx: bool | None) -> dict[str, Any]:
    """`--cpu 2x32` (sockets × physical cores per socket) → the space's `hardware.cpu` block."""
    m = _CPU.match(text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ConfigError(f"--cpu: {text!r} is not SOCKETSxCORES; e.g. --cpu 2x32 (two sockets of 32 physical cores)")
    block: dict[str, Any] = {"sockets": int(m[1]), "cores_per_socket": int(m[2]), "threads_per_core": 2,
                             "numa_nodes": numa_nodes or int(m[1])}
    if amx is not None:
        block["amx"] = amx
    return block


@dataclass(frozen=True)
class InitOptions:
    model: str
    kt_weight_path: str | None = None
    gpus: str | None = None  # a described machine: "8x L20-48G"
    cpu: str | None = None  # "2x32"
    numa_nodes: int | None = None
    amx: bool | None = None
    ram_gib: int | None = None
    kt_method: str = "AMXINT4"
    name: str | None = None
    dataset: str | None = None
    probe_timeout_s: float = 20.0


@dataclass(frozen=True)
class InitResult:
    data: dict[str, Any]  # the space, as written
    text: str  # the YAML with its header
    summary: list[str]  # what was derived, for the terminal


def hardware_block(opts: InitOptions) -> dict[str, Any]:
    block: dict[str, Any] = {}
    if opts.gpus:
        block["gpu"] = parse_gpus(opts.gpus)
    if opts.cpu:
        block["cpu"] = parse_cpu(opts.cpu, opts.numa_nodes, opts.amx)
    elif opts.numa_nodes or opts.amx is not None:
        raise ConfigError("--numa-nodes/--amx: describe the CPU with --cpu SOCKETSxCORES as well, e.g. --cpu 2x32")
    if opts.ram_gib:
        block["ram_gib"] = opts.ram_gib
    return block


def find_interpreters(modules: Sequence[str], timeout_s: float, path: str | None = None) -> list[str]:
    """Interpreters on PATH (python3, python; the first of each real file) that import
    `modules`, in PATH order."""
    seen: set[str] = set()
    found: list[str] = []
    for folder in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        for name in ("python3", "python"):
            exe = shutil.which(name, path=folder) if folder else None
            if exe is None or os.path.realpath(exe) in seen:
                continue
            seen.add(os.path.realpath(exe))
            # Found, not imported: importing sglang takes seconds per interpreter (doctor does that).
            res = run_process([exe, "-c", _FIND, *modules], {}, timeout_s)
            if res.rc == 0 and res.out.strip().endswith("True"):
                found.append(exe)
    return found


def _grid(low: int, high: int, points: int) -> tuple[int, int, int]:
    """low, high, step with a power-of-two step giving at most `points` values; high on the grid."""
    step = 1 << max(0, math.ceil(math.log2(max((high - low) / points, 1))))
    return low, low + (high - low) // step * step, step


def _tp(hw: Hardware, gate_flags: Mapping[str, Any], check: Callable[[Mapping[str, Any]], FeasibilityReport]) -> int:
    """The largest tensor-parallel size over the GPUs that divides the model's attention heads."""
    for tp in range(hw.gpu_count, 0, -1):
        report = check({**gate_flags, "tensor-parallel-size": tp})
        if report.constraints.get("tp_divides_heads", 0) <= 0:
            return tp
    return 1


def build_space(opts: InitOptions, *, interpreters: tuple[list[str], list[str]] | None = None,
                detected: Hardware | None = None) -> InitResult:
    """The search space for `opts` (nothing written). `interpreters`: (server, bench) candidates,
    found on PATH when None; `detected`: this machine, detected when None."""
    model_dir = Path(os.path.expanduser(opts.model)).resolve()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model: {model_dir} has no config.json; give the model's Hugging Face folder")
    model = load_model_sizes(model_dir)
    hw_block = hardware_block(opts)
    hw = resolve_hardware(hw_block or None, detected=detected)
    if not hw.gpus:
        raise ConfigError("--gpus: no GPU detected on this machine; describe the target, e.g. --gpus \"8x L20-48G\"")
    cpu = hw.cpu
    weights = str(Path(os.path.expanduser(opts.kt_weight_path)).resolve()) if opts.kt_weight_path else str(model_dir)
    args: dict[str, Any] = {"model-path": str(model_dir), "kt-weight-path": weights, "kt-method": opts.kt_method,
                            "trust-remote-code": True, "max-total-tokens": AUTO, "enable-mixed-chunk": True,
                            "disable-radix-cache": True, "disable-chunked-prefix-cache": True}
    workloads = [(w["num_prompts"], w["input_len"], w["output_len"]) for w in SEED_WORKLOADS.values()]
    gate = FeasibilityGate(model=model, hardware=hw, workloads=workloads, test_chunk=min(CHUNK_CHOICES))
    probe_flags = {**args, "kt-num-gpu-experts": 0, "kt-cpuinfer": max(cpu.physical_cores - hw.gpu_count, 1),
                   "kt-threadpool-count": 1, "chunked-prefill-size": min(CHUNK_CHOICES),
                   "max-running-requests": SEED_RUNNING}
    tp = _tp(hw, gate.resolve_auto(probe_flags), gate.check)
    args["tensor-parallel-size"] = tp
    cpuinfer = max(cpu.physical_cores - tp, 1)  # the seed rule: one core per GPU rank stays free
    pools = [p for p in range(1, cpu.numa_nodes + 1) if model.moe_intermediate_size % p == 0]
    base = {"kt-cpuinfer": cpuinfer, "kt-threadpool-count": pools[-1], "chunked-prefill-size": SEED_CHUNK,
            "max-running-requests": SEED_RUNNING}
    flags = gate.resolve_auto({**args, **base, "kt-num-gpu-experts": 0})
    # The boundary with the smallest chunk and fewest requests: no configuration fits more experts.
    loose = gate.resolve_auto({**flags, "chunked-prefill-size": min(CHUNK_CHOICES),
                               "max-running-requests": RUNNING_RANGE["low"]})
    top = max_gpu_experts(model, hw, loose, workloads, margin_gb=gate.margin_gb)
    at_base = max_gpu_experts(model, hw, flags, workloads, margin_gb=gate.margin_gb)
    fits = gate.check({**flags, "kt-num-gpu-experts": at_base})
    if not fits.feasible:
        raise ConfigError(f"--model: {model.name} is predicted not to fit this machine even with no expert on the GPUs "
                          f"({gate.summary(fits)}); describe the target machine with --gpus/--cpu/--ram-gib")
    e_low, e_high, e_step = _grid(0, max(top, 1), EXPERT_GRID_POINTS)
    c_step = _grid(max(pools[-1], cpuinfer // 2), cpu.physical_cores, CPUINFER_GRID_POINTS)[2]
    # On the grid through physical cores − GPUs (the seed rule), from about half of it to every core.
    c_low = cpuinfer - (cpuinfer - max(pools[-1], cpuinfer // 2)) // c_step * c_step
    c_high = cpuinfer + (cpu.physical_cores - cpuinfer) // c_step * c_step
    params: dict[str, Any] = {"kt-num-gpu-experts": {"low": e_low, "high": e_high, "step": e_step},
                              "kt-cpuinfer": {"low": c_low, "high": c_high, "step": c_step}}
    if len(pools) > 1:
        params["kt-threadpool-count"] = {"choices": pools}
    else:
        args["kt-threadpool-count"] = pools[0]
        del base["kt-threadpool-count"]
    params["chunked-prefill-size"] = {"choices": list(CHUNK_CHOICES)}
    params["max-running-requests"] = dict(RUNNING_RANGE)
    baseline = {**base, "kt-num-gpu-experts": min(at_base, e_high) // e_step * e_step}
    baseline = {k: baseline[k] for k in params}
    servers, benches = interpreters if interpreters is not None else (
        find_interpreters(["sglang", "kt_kernel"], opts.probe_timeout_s),
        find_interpreters(["sglang.bench_serving"], opts.probe_timeout_s))
    bench: dict[str, Any] = {"python": benches[0] if benches else "python", "tokenizer": str(model_dir),
                             "env": {"HF_HUB_OFFLINE": "1"}, "timeout_s": 3600}
    if opts.dataset:
        bench["dataset_path"] = str(Path(os.path.expanduser(opts.dataset)).resolve())
    name = opts.name or _default_name(model_dir.name, hw)
    data: dict[str, Any] = {
        "name": name,
        "server": {"python": servers[0] if servers else "python", "module": "sglang.launch_server",
                   "host": "127.0.0.1", "start_timeout_s": 2400, "args": args},
        "params": params, "workloads": {k: dict(v) for k, v in SEED_WORKLOADS.items()},
        "objective": [dict(o) for o in SEED_OBJECTIVE], "bench": bench, "baseline": baseline}
    if hw_block:
        data["hardware"] = hw_block
    parse_space(data, check_paths=False)  # what plan and run read must load as written
    summary = [f"machine: {hw.describe()}",
               f"model: {model.name} ({model.n_routed_experts} routed experts per layer), TP{tp}",
               f"kt-num-gpu-experts {e_low}..{e_high} step {e_step} (largest that fits: {top}; {at_base} at the baseline)",
               f"kt-cpuinfer {c_low}..{c_high} step {c_step} (physical cores {cpu.physical_cores} − {tp} GPU ranks = "
               f"{cpuinfer})",
               f"kt-threadpool-count {pools} (≤ {cpu.numa_nodes} NUMA node(s), dividing moe_intermediate_size)",
               f"server.python: {data['server']['python']}" + ("" if servers else " (no interpreter on PATH imports sglang "
                                                             "and kt_kernel: set it)"),
               f"bench.python: {bench['python']}" + ("" if benches else " (no interpreter on PATH has "
                                                    "sglang.bench_serving: set it)")]
    if not opts.dataset:
        summary.append("bench.dataset_path: not set (bench_serving downloads ShareGPT; --dataset PATH for offline)")
    return InitResult(data=data, text=_header(opts, hw) + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100), summary=summary)


def _default_name(model_dir: str, hw: Hardware) -> str:
    gpu = re.sub(r"^nvidia\s+(geforce\s+)?", "", hw.gpus[0].name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", f"{model_dir}-{hw.gpu_count}x{gpu}".lower()).strip("-")


def _header(opts: InitOptions, hw: Hardware) -> str:
    described = " ".join(f"--{k} {v!r}" for k, v in (("gpus", opts.gpus), ("cpu", opts.cpu)) if v)
    where = f"the machine described by {described}" if described else "the machine kttune init ran on"
    return (f"# Written by `kttune init` for {where}: {hw.describe()}.\n"
            "# Ranges come from kttune's feasibility model (kttune plan shows one configuration's memory);\n"
            "# workloads and objective are the seed deployment's. Edit freely; docs/search-space.md has every key.\n")


def write_space(result: InitResult, out: Path, *, force: bool = False) -> Path:
    if out.exists() and not force:
        raise ConfigError(f"--out: {out} exists; pass --force to overwrite it or choose another --out")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: folder {out.parent} does not exist; create it or choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(result.text)
    os.replace(tmp, out)
    return out
