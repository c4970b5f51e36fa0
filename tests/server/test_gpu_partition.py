"""GPU accounting per partition: a server's CUDA_VISIBLE_DEVICES mapped onto NVML devices, and
two workers on one host with disjoint GPUs (simulated GPUs behind the NVML seam)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tuner.errors import TeardownError
from tuner.machine import GpuInfo, NvmlSession, visible_indices, write_sim_gpus
from tuner.server import ServerHandle, find_free_port, start_server, stop_server, wait_ready

HOST = "127.0.0.1"
GIB = 1 << 30
UUIDS = ["GPU-4a1d0c2e-0000-1111-2222-aaaaaaaaaaaa", "GPU-4a1d9f00-3333-4444-5555-bbbbbbbbbbbb"]
MIG = "MIG-6f0e2a77-aaaa-bbbb-cccc-000000000001"
FLAGS = ["--model-path", "tuner/sim/models/qwen3-30b-a3b", "--kt-weight-path", "/sim/Qwen3-30B-A3B-CPU-weight",
         "--kt-method", "AMXINT4", "--kt-cpuinfer", "20", "--kt-threadpool-count", "1", "--kt-num-gpu-experts", "32",
         "--mem-fraction-static", "0.9", "--max-total-tokens", "40000", "--max-running-requests", "16",
         "--chunked-prefill-size", "2048", "--tensor-parallel-size", "1", "--disable-shared-experts-fusion"]


def _gpus() -> list[GpuInfo]:
    return [GpuInfo(i, "H200", 141 * GIB, 140 * GIB, GIB, uuid=u) for i, u in enumerate(UUIDS)]


@pytest.mark.parametrize(("spec", "expected"), [
    (None, None), ("", []), ("1", [1]), ("1,0", [1, 0]), ("0,0", [0]),
    (UUIDS[1], [1]), ("GPU-4a1d9", [1]),  # a unique prefix, as CUDA accepts
    ("GPU-4a1d", []),  # ambiguous: the list ends there
    ("0,7,1", [0]),  # an invalid entry ends the list, as in CUDA
    (f"MIG-{UUIDS[1]}/1/0", [1]), (MIG, [0]), ("MIG-unknown", []),
])
def test_cuda_visible_devices_maps_onto_nvml_indices(spec: str | None, expected: list[int] | None) -> None:
    assert visible_indices(spec, _gpus(), {MIG: 0}) == expected


def _devices(root: Path) -> None:
    write_sim_gpus(root, [{"uuid": u, "name": "Simulated H200", "total": 141 * GIB, "base_used": GIB // 2,
                           "mig": [MIG] if i == 0 else []} for i, u in enumerate(UUIDS)])


def test_simulated_gpus_answer_through_the_nvml_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(tmp_path)
    monkeypatch.setenv("KTTUNE_SIM_NVML", str(tmp_path))
    with NvmlSession() as nvml:
        gpus = nvml.probe_gpus()
        assert [g.uuid for g in gpus] == UUIDS and nvml.used_bytes_total() == GIB
        assert nvml.mig_parents() == {MIG: 0} and nvml.visible(MIG) == [0] and nvml.visible(UUIDS[1]) == [1]


def _server(tmp_path: Path, name: str, visible: str | None) -> ServerHandle:
    port = find_free_port(HOST)
    argv = [sys.executable, "-m", "tuner.sim", "--sim-scenario", "qwen3-30b-a3b-1x4090", "--sim-time-scale", "0.002",
            "--sim-seed", "1", "--host", HOST, "--port", str(port), *FLAGS]
    env = {"KTTUNE_SIM_FAULT": ""} | ({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {})
    h = start_server(argv, log_path=tmp_path / name / "server.log", host=HOST, port=port, env=env)
    wait_ready(h, timeout_s=120)
    return h


def _held_on(index: int) -> int:
    with NvmlSession() as nvml:
        return sum(nvml.gpu_processes([index]).values())


def test_two_workers_on_disjoint_gpus_do_not_hold_up_each_others_teardown(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(tmp_path / "gpus")
    monkeypatch.setenv("KTTUNE_SIM_NVML", str(tmp_path / "gpus"))
    mine = _server(tmp_path, "mine", UUIDS[1])  # this worker: GPU 1, by UUID
    neighbour = _server(tmp_path, "neighbour", "0")  # another worker's server, started after ours: GPU 0
    try:
        assert _held_on(0) > GIB and _held_on(1) > GIB  # each holds memory on its own GPU
        t0 = time.monotonic()
        report = stop_server(mine, term_timeout_s=5, gpu_timeout_s=10, gpu_tolerance_bytes=GIB // 4)
        assert report.gpu_released is True and time.monotonic() - t0 < 8
        assert _held_on(1) == 0 and _held_on(0) > GIB  # ours released; the neighbour's untouched
    finally:
        stop_server(neighbour, term_timeout_s=5, gpu_timeout_s=10)


def test_without_a_partition_the_neighbours_memory_holds_teardown_up(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What the partition fixes: a server that sees every GPU waits on the neighbour's memory."""
    _devices(tmp_path / "gpus")
    monkeypatch.setenv("KTTUNE_SIM_NVML", str(tmp_path / "gpus"))
    mine = _server(tmp_path, "mine", None)
    neighbour = _server(tmp_path, "neighbour", "0")
    try:
        with pytest.raises(TeardownError, match="not released"):
            stop_server(mine, term_timeout_s=5, gpu_timeout_s=1.5, gpu_tolerance_bytes=GIB // 4)
    finally:
        stop_server(neighbour, term_timeout_s=5, gpu_timeout_s=10)
