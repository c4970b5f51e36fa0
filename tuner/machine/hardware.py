"""The machine kttune tunes for: GPUs (NVML through :mod:`tuner.gpu`), CPU topology
(``/proc/cpuinfo``, ``/sys/devices/system/node``), host RAM (psutil), and the search space's
``hardware:`` overrides, which can set any of it (e.g. to plan for a machine not at hand).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class CpuSpec:
    model: str
    sockets: int
    physical_cores: int
    logical_cores: int
    numa_nodes: int
    cores_per_node: tuple[int, ...]  # physical cores on each NUMA node
    amx: bool
    avx512: bool

    @property
    def min_cores_per_node(self) -> int:
        return min(self.cores_per_node) if self.cores_per_node else self.physical_cores // max(self.numa_nodes, 1)


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GpuSpec, ...]
    cpu: CpuSpec
    ram_bytes: int
    ram_available_bytes: int
    source: str = "detected"  # "detected", "override" or "detected+override"

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def describe(self) -> str:
        g = self.gpus
        gpu = f"{len(g)}x {g[0].name} {g[0].total_bytes / GIB:.1f} GiB" if g else "no GPU"
        c = self.cpu
        return (f"{gpu}; {c.sockets} socket(s), {c.physical_cores} cores / {c.logical_cores} threads, "
                f"{c.numa_nodes} NUMA node(s){', AMX' if c.amx else ''}{', AVX-512' if c.avx512 else ''}; "
                f"RAM {self.ram_bytes / GIB:.0f} GiB ({self.ram_available_bytes / GIB:.0f} available) [{self.source}]")


# --- detection -----------------------------------------------------------------------------
def _parse_cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for chunk in text.strip().split(","):
        if "-" in chunk:
            lo, hi = chunk.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif chunk:
            cpus.append(int(chunk))
    return cpus


def detect_cpu(proc_root: str | Path = "/proc", sys_root: str | Path = "/sys") -> CpuSpec:
    """CPU topology from cpuinfo and sysfs; falls back to os/psutil counts when files are missing."""
    cores: dict[int, tuple[str, str]] = {}  # logical cpu -> (physical id, core id)
    flags: set[str] = set()
    model = "unknown"
    try:
        text = (Path(proc_root) / "cpuinfo").read_text()
    except OSError:
        text = ""
    for block in re.split(r"\n\s*\n", text):
        info = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines()) if k.strip())
        if "processor" not in info or not info["processor"].isdigit():
            continue
        cpu = int(info["processor"])
        cores[cpu] = (info.get("physical id", "0"), info.get("core id", str(cpu)))
        flags |= set(info.get("flags", "").split())
        model = info.get("model name", model)
    if cores:
        logical, physical = len(cores), len(set(cores.values()))
        sockets = len({p for p, _ in cores.values()})
    else:
        import psutil

        logical = os.cpu_count() or 1
        physical = psutil.cpu_count(logical=False) or logical
        sockets = 1
    node_dir = Path(sys_root) / "devices/system/node"
    per_node: list[int] = []
    for node in sorted(node_dir.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _parse_cpulist((node / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        if not cpus:
            continue  # memory-only node (CXL, HBM)
        per_node.append(len({cores.get(c, ("0", str(c))) for c in cpus}) if cores else len(cpus))
    if not per_node:
        per_node = [physical]
    return CpuSpec(model=model, sockets=sockets, physical_cores=physical, logical_cores=logical,
                   numa_nodes=len(per_node), cores_per_node=tuple(per_node),
                   amx=bool({"amx_tile", "amx_int8", "amx_bf16"} & flags), avx512="avx512f" in flags)


def _probe_gpus() -> list[Any]:
    try:
        from tuner.machine.gpu import probe_gpus
    except ImportError:
        return []
    return list(probe_gpus())


def detect_hardware(*, probe: Callable[[], Sequence[Any]] | None = None, proc_root: str | Path = "/proc",
                    sys_root: str | Path = "/sys") -> Hardware:
    """What this machine has. ``probe`` returns objects with index, name, total_bytes and
    free_bytes (default: :func:`tuner.gpu.probe_gpus`, ``[]`` without NVML). A numeric
    ``CUDA_VISIBLE_DEVICES`` selects and renumbers the GPUs as CUDA would."""
    import psutil

    gpus = tuple(GpuSpec(int(g.index), str(g.name), int(g.total_bytes), int(g.free_bytes))
                 for g in (probe or _probe_gpus)())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "")
    if visible and all(v.isdigit() for v in visible.split(",")):  # NVML ignores it; the server does not
        by_index = {g.index: g for g in gpus}
        gpus = tuple(replace(by_index[int(v)], index=i) for i, v in enumerate(visible.split(",")) if int(v) in by_index)
    mem = psutil.virtual_memory()
    return Hardware(gpus=gpus, cpu=detect_cpu(proc_root, sys_root), ram_bytes=int(mem.total),
                    ram_available_bytes=int(mem.available))


# --- overrides -------------------------------------------------------------------------------
_GPU_KEYS = {"count", "name", "memory_gib", "memory_gb", "memory_mib", "free_gib", "free_gb", "free_mib"}
_CPU_KEYS = {"model", "sockets", "cores_per_socket", "threads_per_core", "physical_cores", "logical_cores",
             "numa_nodes", "amx", "avx512"}
_TOP_KEYS = {"gpu", "cpu", "ram_gib", "ram_gb", "ram_available_gib", "ram_available_gb"}


def _number(section: str, key: str, value: Any, *, integer: bool = False, minimum: float = 0.0) -> float:
    field = f"hardware.{section}{key}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{field} must be a number; got {value!r}")
    try:
        num = float(value)
    except ValueError:
        raise ConfigError(f"{field} must be a number; got {value!r}") from None
    if not math.isfinite(num):
        raise ConfigError(f"{field} must be a finite number; got {value!r}")
    if integer and num != int(num):
        raise ConfigError(f"{field} must be a whole number; got {value!r}")
    if num < minimum:
        raise ConfigError(f"{field} must be >= {minimum:g}; got {value!r}")
    return num


def _bytes(section: str, block: Mapping[str, Any], stem: str) -> int | None:
    for suffix, unit in (("gib", GIB), ("gb", 1e9), ("mib", MIB)):
        key = f"{stem}_{suffix}"
        if key in block:
            num = _number(section, key, block[key])
            if num <= 0:
                raise ConfigError(f"hardware.{section}{key} must be positive; got {block[key]!r}")
            return int(num * unit)
    return None


def _flag(section: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"hardware.{section}{key} must be true or false; got {value!r}")
    return value


def _check_keys(section: str, block: Any, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(block, Mapping):
        raise ConfigError(f"hardware.{section.rstrip('.')} must be a mapping; got {block!r}")
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise ConfigError(f"unknown key hardware.{section}{unknown[0]}; allowed: {', '.join(sorted(allowed))}")
    return block


def _apply_gpu(gpus: tuple[GpuSpec, ...], block: Mapping[str, Any]) -> tuple[GpuSpec, ...]:
    block = _check_keys("gpu.", block, _GPU_KEYS)
    count = int(_number("gpu.", "count", block["count"], integer=True)) if "count" in block else len(gpus)
    total = _bytes("gpu.", block, "memory")
    free = _bytes("gpu.", block, "free")
    if count and total is None and not gpus:
        raise ConfigError("hardware.gpu.memory_gib is required: no GPU was detected to take the memory size from")
    template = gpus[0] if gpus else GpuSpec(0, "GPU", 0, 0)
    out = []
    for i in range(count):
        base = gpus[i] if i < len(gpus) else replace(template, index=i)
        t = total if total is not None else base.total_bytes
        f = free if free is not None else (t if total is not None else base.free_bytes)
        if f > t:
            raise ConfigError(f"hardware.gpu free memory ({f / GIB:.1f} GiB) exceeds memory ({t / GIB:.1f} GiB)")
        out.append(GpuSpec(i, str(block.get("name", base.name)), t, f))
    return tuple(out)


def _apply_cpu(cpu: CpuSpec, block: Mapping[str, Any]) -> CpuSpec:
    block = _check_keys("cpu.", block, _CPU_KEYS)

    def num(key: str, default: int) -> int:
        return int(_number("cpu.", key, block[key], integer=True, minimum=1)) if key in block else default

    sockets = num("sockets", cpu.sockets)
    per_socket = num("cores_per_socket", max(cpu.physical_cores // max(cpu.sockets, 1), 1))
    physical = num("physical_cores", sockets * per_socket if {"sockets", "cores_per_socket"} & set(block) else cpu.physical_cores)
    threads = num("threads_per_core", max(cpu.logical_cores // max(cpu.physical_cores, 1), 1))
    changed = {"sockets", "cores_per_socket", "physical_cores", "threads_per_core"} & set(block)
    logical = num("logical_cores", physical * threads if changed else cpu.logical_cores)
    if logical < physical:
        raise ConfigError(f"hardware.cpu.logical_cores ({logical}) must be >= physical cores ({physical})")
    nodes = num("numa_nodes", sockets if "sockets" in block else cpu.numa_nodes)
    if nodes > physical:
        raise ConfigError(f"hardware.cpu.numa_nodes ({nodes}) cannot exceed the physical core count ({physical})")
    if nodes == cpu.numa_nodes and not changed:
        per_node = cpu.cores_per_node
    else:
        per_node = tuple(physical // nodes + (1 if i < physical % nodes else 0) for i in range(nodes))
    return CpuSpec(model=str(block.get("model", cpu.model)), sockets=sockets, physical_cores=physical,
                   logical_cores=logical, numa_nodes=nodes, cores_per_node=per_node,
                   amx=_flag("cpu.", "amx", block["amx"]) if "amx" in block else cpu.amx,
                   avx512=_flag("cpu.", "avx512", block["avx512"]) if "avx512" in block else cpu.avx512 or
                   bool(block.get("amx", False)))


def resolve_hardware(overrides: Mapping[str, Any] | None = None, *, detected: Hardware | None = None) -> Hardware:
    """Detected hardware with the search space's ``hardware:`` block applied, e.g.
    ``{gpu: {count: 8, name: L20, memory_mib: 46068}, cpu: {sockets: 2, cores_per_socket: 32,
    threads_per_core: 2, numa_nodes: 2, amx: true}, ram_gib: 1024}``. Memory sizes accept
    ``_gib``, ``_gb`` or ``_mib`` suffixes; GPU free memory defaults to the total when the
    memory is overridden. Impossible values raise ConfigError naming the field."""
    hw = detected if detected is not None else detect_hardware()
    if not overrides:
        return hw
    block = _check_keys("", overrides, _TOP_KEYS)
    gpus = _apply_gpu(hw.gpus, block["gpu"]) if "gpu" in block else hw.gpus
    cpu = _apply_cpu(hw.cpu, block["cpu"]) if "cpu" in block else hw.cpu
    ram = _bytes("", block, "ram") or hw.ram_bytes
    avail = _bytes("", block, "ram_available") or (ram if "ram_gib" in block or "ram_gb" in block else hw.ram_available_bytes)
    if avail > ram:
        raise ConfigError(f"hardware.ram_available ({avail / GIB:.0f} GiB) exceeds hardware.ram ({ram / GIB:.0f} GiB)")
    return Hardware(gpus=gpus, cpu=cpu, ram_bytes=ram, ram_available_bytes=avail, source="detected+override")
