"""The simulated server's GPU memory, as kttune's NVML seam sees it (tuner.machine.simgpu).

With ``KTTUNE_SIM_NVML`` set, a server that has loaded its weights and KV cache records that
its TP0 scheduler holds that much on each GPU its ``CUDA_VISIBLE_DEVICES`` selects (indices,
UUIDs, MIG entries: mapped as kttune maps them), up to its tensor-parallel size. The memory is
released when that process exits, as the driver releases it."""
from __future__ import annotations

import os
from pathlib import Path

from tuner.machine import SIM_NVML_ENV, NvmlSession, hold_sim_gpu_memory


def hold_gpu_memory(pid: int, gib_per_gpu: float, tp: int) -> list[int]:
    """Record that ``pid`` holds ``gib_per_gpu`` on its visible GPUs; returns their indices."""
    root = os.environ.get(SIM_NVML_ENV, "").strip()
    if not root:
        return []
    with NvmlSession() as nvml:
        gpus = nvml.probe_gpus()
        visible = nvml.visible(os.environ.get("CUDA_VISIBLE_DEVICES"))
    chosen = [g for g in gpus if visible is None or g.index in visible][:max(1, tp)]
    hold_sim_gpu_memory(Path(root), pid, {g.uuid: int(gib_per_gpu * 2**30) for g in chosen})
    return [g.index for g in chosen]
