"""GPU inventory and per-process GPU memory through NVML (``pynvml`` from nvidia-ml-py).

Every function degrades to an empty answer (``[]``, ``{}``, ``None``) when the NVML
library, the driver or a GPU is missing, so callers on CPU-only hosts need no guards.
NVML ignores ``CUDA_VISIBLE_DEVICES``: indices here are NVML (physical) indices.
In a container without the host PID namespace NVML reports host PIDs, which then
match no local process; memory totals stay meaningful.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType, TracebackType


@dataclass(frozen=True)
class GpuInfo:
    """One device's identity and memory, in bytes."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


class NvmlSession:
    """An initialised NVML connection, for polling loops that should not re-init NVML.

    Use as a context manager. ``available`` is False when NVML could not be loaded or
    initialised; every query then returns an empty answer.
    """

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None

    def __enter__(self) -> NvmlSession:
        try:
            nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception:  # ImportError, NVMLError_LibraryNotFound, driver errors, ...
            self._nvml = None
        else:
            self._nvml = nvml
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

    @property
    def available(self) -> bool:
        """True when NVML is initialised and reports at least one device."""
        return self._device_count() > 0

    def _device_count(self) -> int:
        if self._nvml is None:
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except Exception:
            return 0

    def probe_gpus(self) -> list[GpuInfo]:
        """All devices NVML can read; a device that errors is skipped."""
        nvml = self._nvml
        if nvml is None:
            return []
        gpus: list[GpuInfo] = []
        for index in range(self._device_count()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:
                continue
            if isinstance(name, bytes):  # older bindings return bytes
                name = name.decode(errors="replace")
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(name),
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    used_bytes=int(mem.used),
                )
            )
        return gpus

    def gpu_processes(self) -> dict[int, int]:
        """PID -> GPU memory in bytes, summed over all devices (compute apps only).

        A process whose usage NVML cannot report (``usedGpuMemory`` None) maps to 0,
        so its presence is still visible.
        """
        nvml = self._nvml
        if nvml is None:
            return {}
        usage: dict[int, int] = {}
        for index in range(self._device_count()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:
                continue
            for proc in procs:
                used = getattr(proc, "usedGpuMemory", None)
                pid = int(proc.pid)
                usage[pid] = usage.get(pid, 0) + (int(used) if used else 0)
        return usage

    def used_bytes_total(self) -> int | None:
        """Used memory summed over all devices, or None without NVML or GPUs."""
        gpus = self.probe_gpus()
        if not gpus:
            return None
        return sum(g.used_bytes for g in gpus)


def probe_gpus() -> list[GpuInfo]:
    """Devices with their memory, or ``[]`` when NVML or a GPU is unavailable."""
    with NvmlSession() as nvml:
        return nvml.probe_gpus()


def gpu_processes() -> dict[int, int]:
    """PID -> GPU bytes over all devices (compute apps), or ``{}`` without NVML."""
    with NvmlSession() as nvml:
        return nvml.gpu_processes()


def used_bytes_total() -> int | None:
    """Used GPU memory over all devices in bytes, or None without NVML or GPUs."""
    with NvmlSession() as nvml:
        return nvml.used_bytes_total()
