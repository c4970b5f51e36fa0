"""`kttune init`: a search space for one model on one machine (this one, or one described by
`--gpus`/`--cpu`), with its ranges taken from the feasibility model instead of guessed:
kt-num-gpu-experts up to the largest count that fits, kt-cpuinfer around physical cores −
GPUs, kt-threadpool-count up to the NUMA nodes. The seed deployment's two workloads and
objective, and the interpreters found on PATH that have sglang."""
from __future__ import annotations

import dataclasses
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
from tuner.feasibility import FeasibilityGate, FeasibilityReport
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
# CPU prefill of a long prompt can stall a forward past SGLang's 300 s default watchdog, which
# then kills a working server; the seed deployment's guide runs with 3000 s.
WATCHDOG_TIMEOUT_S = 3000
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


def parse_cpu(text: str, numa_nodes: int | None) -> dict[str, Any]:
    """`--cpu 2x32` (sockets × physical cores per socket) → the space's `hardware.cpu` block."""
    m = _CPU.match(text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ConfigError(f"--cpu: {text!r} is not SOCKETSxCORES; e.g. --cpu 2x32 (two sockets of 32 physical cores)")
    if numa_nodes is not None and not 1 <= numa_nodes <= int(m[1]) * int(m[2]):
        raise ConfigError(f"--numa-nodes: {numa_nodes} is not between 1 and the described cores ({int(m[1]) * int(m[2])})")
    return {"sockets": int(m[1]), "cores_per_socket": int(m[2]), "threads_per_core": 2,
            "numa_nodes": numa_nodes or int(m[1])}


@dataclass(frozen=True)
class InitOptions:
    model: str
    kt_weight_path: str | None = None
    gpus: str | None = None  # a described machine: "8x L20-48G"
    cpu: str | None = None  # "2x32"
    numa_nodes: int | None = None
    amx: bool | None = None
    avx512: bool | None = None
    ram_gib: int | None = None
    kt_method: str | None = None  # None: AMXINT4 where the CPU runs it
    name: str | None = None
    dataset: str | None = None
    probe_timeout_s: float = 20.0


@dataclass(frozen=True)
class InitResult:
    data: dict[str, Any]  # the space, as written
    text: str  # the YAML with its header
    summary: list[str]  # what was derived, for the terminal


def hardware_block(opts: InitOptions) -> tuple[dict[str, Any], list[str]]:
    """The space's `hardware:` block and a line for each fact of a described machine that was
    defaulted. A machine described by --gpus or --cpu takes nothing from the host kttune runs
    on: the GPUs, the CPU and the RAM are asked for, AMX and AVX-512 default to absent."""
    if not (opts.gpus or opts.cpu):
        if opts.numa_nodes or opts.amx is not None or opts.avx512 is not None or opts.ram_gib:
            raise ConfigError("--numa-nodes/--amx/--avx512/--ram-gib: describe the machine with --gpus and --cpu as "
                              "well, e.g. --gpus \"8x L20-48G\" --cpu 2x32 (without them init reads this machine)")
        return {}, []
    gpu = parse_gpus(opts.gpus) if opts.gpus else {}
    cpu = parse_cpu(opts.cpu, opts.numa_nodes) if opts.cpu else {}
    if not opts.cpu:
        raise ConfigError("--cpu: a machine described by --gpus needs its CPU too, e.g. --cpu 2x32 (sockets x "
                          "physical cores); this machine's CPU is not taken for it")
    if not opts.gpus:
        raise ConfigError("--gpus: a machine described by --cpu needs its GPUs too, e.g. --gpus \"8x L20-48G\"; "
                          "this machine's GPUs are not taken for it")
    if not opts.ram_gib:
        raise ConfigError("--ram-gib: give the described machine's host RAM in GiB (the CPU experts live there); "
                          "this machine's RAM is not taken for it")
    defaulted: list[str] = []
    amx = bool(opts.amx)
    if opts.amx is None:
        defaulted.append("AMX: not described, assumed absent (--amx if the CPU has it)")
    avx512 = amx if opts.avx512 is None else opts.avx512
    if opts.avx512 is None and not amx:
        defaulted.append("AVX-512: not described, assumed absent (--avx512 if the CPU has it)")
    if "memory_gib" not in gpu and "memory_mib" not in gpu:
        raise ConfigError(f"--gpus: {opts.gpus!r} has no memory size; e.g. --gpus \"{gpu['count']}x {gpu['name']}-48G\" "
                          "(this machine's GPUs are not taken for it)")
    return {"gpu": gpu, "cpu": {**cpu, "amx": amx, "avx512": avx512}, "ram_gib": opts.ram_gib}, defaulted


def kt_method(opts: InitOptions, hw: Hardware) -> str:
    """--kt-method, or AMXINT4 where the CPU runs it; the format of the CPU weights is the
    user's to name otherwise, since kttune cannot convert them."""
    if opts.kt_method:
        return opts.kt_method
    if hw.cpu.amx or hw.cpu.avx512:
        return "AMXINT4"
    cpu = "the described CPU (pass --amx or --avx512 if it has them)" if opts.cpu else "this machine's CPU"
    raise ConfigError(f"--kt-method: {cpu} has neither AMX nor AVX-512, which AMXINT4 needs; name the format of "
                      "the CPU weights at --kt-weight-path, e.g. --kt-method LLAMAFILE")


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
    hw_block, defaulted = hardware_block(opts)
    hw = resolve_hardware(hw_block or None, detected=detected)
    if hw_block:
        hw = dataclasses.replace(hw, source="described")
    if not hw.gpus:
        raise ConfigError("--gpus: no GPU detected on this machine; describe the target, e.g. --gpus \"8x L20-48G\"")
    cpu = hw.cpu
    weights = str(Path(os.path.expanduser(opts.kt_weight_path)).resolve()) if opts.kt_weight_path else str(model_dir)
    args: dict[str, Any] = {"model-path": str(model_dir), "kt-weight-path": weights, "kt-method": kt_method(opts, hw),
                            "trust-remote-code": True, "watchdog-timeout": WATCHDOG_TIMEOUT_S, "max-total-tokens": AUTO, "enable-mixed-chunk": True,
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
    loose = gate.resolve_auto({**args, **base, "kt-num-gpu-experts": 0, "chunked-prefill-size": min(CHUNK_CHOICES),
                               "max-running-requests": RUNNING_RANGE["low"]})
    top, top_at = gate.largest_gpu_experts(loose)  # what `kttune plan --set` of these settings answers
    at_base, base_at = gate.largest_gpu_experts(flags)
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
    summary = [f"machine: {hw.describe()}", *defaulted,
               f"model: {model.name} ({model.n_routed_experts} routed experts per layer), TP{tp}",
               f"kt-num-gpu-experts {e_low}..{e_high} step {e_step}, baseline {baseline['kt-num-gpu-experts']}: "
               "the grid points at or below the largest that fits (kttune plan --set gives the same)",
               f"  {top} at {top_at} (the space's loosest), {at_base} at the baseline's {base_at}",
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
