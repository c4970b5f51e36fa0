"""GPU inventory and per-process GPU memory through NVML (``pynvml`` from nvidia-ml-py).

Every function degrades to an empty answer (``[]``, ``{}``, ``None``) when the NVML
library, the driver or a GPU is missing, so callers on CPU-only hosts need no guards.
NVML ignores ``CUDA_VISIBLE_DEVICES``: indices here are NVML (physical) indices, and
:func:`visible_indices` maps a ``CUDA_VISIBLE_DEVICES`` value onto them, so that a server's
memory is watched on its own GPUs only (several workers on one host, disjoint GPUs).
``KTTUNE_SIM_NVML`` swaps the driver for simulated GPUs (tuner.machine.simgpu).
In a container without the host PID namespace NVML reports host PIDs, which then
match no local process; memory totals stay meaningful.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tuner.machine.simgpu import SIM_NVML_ENV, SimNvml


@dataclass(frozen=True)
class GpuInfo:
    """One device's identity and memory, in bytes."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    uuid: str = ""


def visible_indices(spec: str | None, gpus: Sequence[GpuInfo],
                    mig_parents: Mapping[str, int] | None = None) -> list[int] | None:
    """NVML indices of the devices ``CUDA_VISIBLE_DEVICES=spec`` lets a process use; None when
    unset (all of them).

    Entries, as CUDA reads them: an ordinal, a GPU UUID (``GPU-…``, a unique prefix is
    enough), a MIG device (``MIG-<uuid>`` through ``mig_parents``, or the older
    ``MIG-GPU-<uuid>/<gi>/<ci>``), which counts as its parent GPU. As in CUDA, the list ends at
    the first entry that names no device. Ordinals are taken in NVML's (PCI bus) order, which
    is CUDA's with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and, on hosts of one GPU model, its default
    order too."""
    if spec is None:
        return None
    by_index = {g.index: g for g in gpus}
    out: list[int] = []
    for raw in spec.split(","):
        item = raw.strip()
        found: int | None = None
        if item.lstrip("-").isdigit():
            found = int(item) if int(item) in by_index else None
        elif item.startswith("MIG-GPU-"):
            found = _by_uuid(item[len("MIG-"):].split("/")[0], gpus)
        elif item.startswith("MIG-"):
            found = (mig_parents or {}).get(item)
        elif item:
            found = _by_uuid(item, gpus)
        if found is None:
            break
        if found not in out:
            out.append(found)
    return out


def _by_uuid(prefix: str, gpus: Sequence[GpuInfo]) -> int | None:
    matches = [g.index for g in gpus if g.uuid and g.uuid.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


class NvmlSession:
    """An initialised NVML connection, for polling loops that should not re-init NVML.

    Use as a context manager. ``available`` is False when NVML could not be loaded or
    initialised; every query then returns an empty answer.
    """

    def __init__(self) -> None:
        self._nvml: Any = None

    def __enter__(self) -> NvmlSession:
        sim = os.environ.get(SIM_NVML_ENV, "").strip()
        try:
            if sim:
                nvml: Any = SimNvml(Path(sim))
                nvml.nvmlInit()
                self._nvml = nvml
                return self
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
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except Exception:  # a binding without it: devices are then matched by ordinal only
                uuid = ""
            name = _text(name)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(name),
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    used_bytes=int(mem.used),
                    uuid=uuid,
                )
            )
        return gpus

    def mig_parents(self) -> dict[str, int]:
        """MIG device UUID -> the NVML index of its GPU ({} without MIG or NVML)."""
        nvml = self._nvml
        out: dict[str, int] = {}
        if nvml is None:
            return out
        for index in range(self._device_count()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                count = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
            except Exception:  # no MIG support, MIG off, old driver
                continue
            for k in range(count):
                try:
                    out[_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)))] = index
                except Exception:  # an empty MIG slot
                    continue
        return out

    def visible(self, spec: str | None) -> list[int] | None:
        """:func:`visible_indices` of ``spec`` on this session's devices."""
        if spec is None:
            return None
        return visible_indices(spec, self.probe_gpus(), self.mig_parents() if "MIG-" in spec else None)

    def gpu_processes(self, indices: Sequence[int] | None = None) -> dict[int, int]:
        """PID -> GPU memory in bytes, summed over the devices ``indices`` (default: all;
        compute apps only).

        A process whose usage NVML cannot report (``usedGpuMemory`` None) maps to 0,
        so its presence is still visible.
        """
        nvml = self._nvml
        if nvml is None:
            return {}
        usage: dict[int, int] = {}
        for index in range(self._device_count()) if indices is None else indices:
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

    def used_bytes_total(self, indices: Sequence[int] | None = None) -> int | None:
        """Used memory summed over the devices ``indices`` (default: all), or None without
        NVML or GPUs."""
        gpus = [g for g in self.probe_gpus() if indices is None or g.index in indices]
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


def used_bytes_total(visible_devices: str | None = None) -> int | None:
    """Used GPU memory in bytes over the devices a ``CUDA_VISIBLE_DEVICES=visible_devices``
    process sees (default: all), or None without NVML or GPUs."""
    with NvmlSession() as nvml:
        return nvml.used_bytes_total(nvml.visible(visible_devices))


def _text(value: Any) -> str:
    """NVML strings: older bindings return bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
