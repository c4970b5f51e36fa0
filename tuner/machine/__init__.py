"""The machine a study runs on: GPUs (NVML), CPU topology, RAM, and the model's sizes from
its config.json; a space's `hardware:` block can describe another machine."""
from __future__ import annotations

from tuner.machine.gpu import GpuInfo, NvmlSession, gpu_processes, probe_gpus, used_bytes_total, visible_indices
from tuner.machine.hardware import GIB, MIB, Hardware, detect_cpu, detect_hardware, resolve_hardware
from tuner.machine.model import ModelSizes, load_model_sizes
from tuner.machine.simgpu import SIM_NVML_ENV, hold_sim_gpu_memory, write_sim_gpus

__all__ = [
    "GIB",
    "GpuInfo",
    "Hardware",
    "MIB",
    "ModelSizes",
    "NvmlSession",
    "SIM_NVML_ENV",
    "detect_cpu",
    "detect_hardware",
    "gpu_processes",
    "hold_sim_gpu_memory",
    "load_model_sizes",
    "probe_gpus",
    "resolve_hardware",
    "used_bytes_total",
    "visible_indices",
    "write_sim_gpus",
]
