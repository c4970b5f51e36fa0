"""Simulated GPUs behind the NVML calls kttune makes, for simulated servers (tests, benchmarks).

With ``KTTUNE_SIM_NVML=<dir>`` set, `tuner.machine.NvmlSession` reads this instead of the
driver: ``<dir>/devices.json`` lists the devices (``uuid``, ``name``, ``total``, ``base_used``
bytes, optional ``mig``: MIG device UUIDs), and each simulated process that holds GPU memory
writes ``<dir>/procs/<pid>.json`` (`hold_sim_gpu_memory`) with its bytes per device UUID. Like the driver, a
holder's memory is released when the process is gone (dead, or a zombie), whatever its file
says; the file's recorded start time guards against PID reuse.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

SIM_NVML_ENV = "KTTUNE_SIM_NVML"
_CREATE_TOL_S = 0.05


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Process:
    pid: int
    usedGpuMemory: int  # noqa: N815 (pynvml's field name)


def write_sim_gpus(root: Path, devices: Sequence[Mapping[str, Any]]) -> None:
    """Set up the simulated devices (``uuid``, ``name``, ``total``, ``base_used``, ``mig``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "procs").mkdir(exist_ok=True)
    _write(root / "devices.json", [dict(d) for d in devices])


def hold_sim_gpu_memory(root: Path, pid: int, usage: Mapping[str, int]) -> None:
    """Process ``pid`` holds ``usage`` bytes per device UUID until it exits."""
    _write(root / "procs" / f"{pid}.json",
           {"pid": pid, "create_time": psutil.Process(pid).create_time(), "used": dict(usage)})


def devices(root: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((root / "devices.json").read_text())
    except (OSError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - created) <= _CREATE_TOL_S
    except psutil.Error:
        return False


class SimNvml:
    """The subset of ``pynvml`` that `NvmlSession` calls, answered from the files above."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if not (self.root / "devices.json").exists():
            raise RuntimeError(f"{SIM_NVML_ENV}: no devices.json in {self.root}")

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def _holders(self) -> list[tuple[int, dict[str, int]]]:
        out = []
        for path in sorted((self.root / "procs").glob("*.json")):
            try:
                data = json.loads(path.read_text())
                pid, created, used = int(data["pid"]), float(data["create_time"]), dict(data["used"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if _alive(pid, created):
                out.append((pid, {str(k): int(v) for k, v in used.items()}))
        return out

    def _device(self, handle: int) -> dict[str, Any]:
        devs = devices(self.root)
        if not 0 <= handle < len(devs):
            raise RuntimeError(f"no simulated GPU {handle}")
        return devs[handle]

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(devices(self.root))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        self._device(index)
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return str(self._device(handle).get("name", "Simulated GPU"))

    def nvmlDeviceGetUUID(self, handle: int | str) -> str:  # noqa: N802
        if isinstance(handle, str):  # a MIG device's handle is its UUID here
            return handle
        return str(self._device(handle)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:  # noqa: N802
        dev = self._device(handle)
        used = int(dev.get("base_used", 0)) + sum(u.get(dev["uuid"], 0) for _, u in self._holders())
        total = int(dev["total"])
        return _Memory(total=total, free=max(0, total - used), used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Process]:  # noqa: N802
        uuid = self._device(handle)["uuid"]
        return [_Process(pid, u[uuid]) for pid, u in self._holders() if uuid in u]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: int) -> int:  # noqa: N802
        return len(self._device(handle).get("mig", []))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, index: int) -> str:  # noqa: N802
        return str(self._device(handle).get("mig", [])[index])
