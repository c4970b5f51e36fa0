from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import ConfigError
from tuner.machine.gpu import GpuInfo
from tuner.machine.hardware import GIB, MIB, CpuSpec, GpuSpec, Hardware, detect_cpu, detect_hardware, resolve_hardware


def _fake_host(tmp_path: Path) -> tuple[Path, Path]:
    """2 sockets x 2 cores x 2 threads; cpus 0-3 are the first threads, 4-7 their siblings."""
    blocks = []
    for cpu in range(8):
        socket, core = (cpu % 4) // 2, cpu % 2
        flags = "fpu sse avx2 avx512f avx512bw amx_tile amx_int8"
        blocks.append(f"processor\t: {cpu}\nmodel name\t: Xeon Test\nphysical id\t: {socket}\n"
                      f"core id\t\t: {core}\nflags\t\t: {flags}\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text("\n".join(blocks) + "\n")
    node = tmp_path / "sys" / "devices" / "system" / "node"
    for i, cpus in enumerate(["0-1,4-5", "2-3,6-7", ""]):  # node2: memory only (CXL)
        (node / f"node{i}").mkdir(parents=True)
        (node / f"node{i}" / "cpulist").write_text(cpus + "\n")
    return proc, tmp_path / "sys"


def test_detect_cpu_topology(tmp_path):
    proc, sys = _fake_host(tmp_path)
    cpu = detect_cpu(proc, sys)
    assert (cpu.sockets, cpu.physical_cores, cpu.logical_cores) == (2, 4, 8)
    assert (cpu.numa_nodes, cpu.cores_per_node) == (2, (2, 2))
    assert cpu.amx and cpu.avx512 and cpu.model == "Xeon Test"


def test_detect_without_sysfs_or_cpuinfo(tmp_path):
    cpu = detect_cpu(tmp_path / "none", tmp_path / "none")
    assert cpu.numa_nodes == 1 and cpu.physical_cores >= 1 and cpu.logical_cores >= cpu.physical_cores


def test_detect_hardware_uses_the_probe(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc, sys = _fake_host(tmp_path)
    probe = lambda: [GpuInfo(0, "NVIDIA L20", 46068 * MIB, 45000 * MIB, 1068 * MIB)]  # noqa: E731
    hw = detect_hardware(probe=probe, proc_root=proc, sys_root=sys)
    assert hw.gpus == (GpuSpec(0, "NVIDIA L20", 46068 * MIB, 45000 * MIB),)
    assert hw.ram_bytes > 0 and 0 < hw.ram_available_bytes <= hw.ram_bytes
    assert "1x NVIDIA L20" in hw.describe()
    assert detect_hardware(probe=list, proc_root=proc, sys_root=sys).gpus == ()


BASE = Hardware(gpus=(GpuSpec(0, "RTX 4090", 24564 * MIB, 24000 * MIB),),
                cpu=CpuSpec("x", 1, 16, 32, 1, (16,), False, True), ram_bytes=128 * GIB, ram_available_bytes=100 * GIB)


def test_overrides_build_the_seed_machine():
    hw = resolve_hardware({"gpu": {"count": 8, "name": "L20", "memory_mib": 46068},
                           "cpu": {"sockets": 2, "cores_per_socket": 32, "threads_per_core": 2, "amx": True},
                           "ram_gib": 1024}, detected=BASE)
    assert len(hw.gpus) == 8 and {g.name for g in hw.gpus} == {"L20"}
    assert hw.gpus[7].total_bytes == hw.gpus[7].free_bytes == 46068 * MIB  # free defaults to the total
    c = hw.cpu
    assert (c.sockets, c.physical_cores, c.logical_cores, c.numa_nodes, c.cores_per_node) == (2, 64, 128, 2, (32, 32))
    assert c.amx and c.avx512
    assert hw.ram_bytes == hw.ram_available_bytes == 1024 * GIB


def test_partial_overrides_keep_detected_values():
    hw = resolve_hardware({"gpu": {"free_gib": 20}}, detected=BASE)
    assert hw.gpus[0].total_bytes == 24564 * MIB and hw.gpus[0].free_bytes == 20 * GIB
    hw = resolve_hardware({"gpu": {"count": 2}, "cpu": {"numa_nodes": 2}}, detected=BASE)
    assert [g.index for g in hw.gpus] == [0, 1] and hw.gpus[1].total_bytes == 24564 * MIB
    assert hw.cpu.numa_nodes == 2 and hw.cpu.cores_per_node == (8, 8) and hw.ram_bytes == 128 * GIB
    assert resolve_hardware(None, detected=BASE) is BASE
    assert resolve_hardware({"gpu": {"count": 0}}, detected=BASE).gpus == ()


@pytest.mark.parametrize("overrides, field", [
    ({"gpu": {"memory_gib": -48}}, "hardware.gpu.memory_gib"),
    ({"gpu": {"count": 2.5}}, "hardware.gpu.count"),
    ({"gpu": {"count": -1}}, "hardware.gpu.count"),
    ({"gpu": {"memory_gib": 24, "free_gib": 30}}, "free memory"),
    ({"gpu": {"vram": 48}}, "hardware.gpu.vram"),
    ({"cpu": {"numa_nodes": 17}}, "numa_nodes"),
    ({"cpu": {"sockets": 0}}, "hardware.cpu.sockets"),
    ({"cpu": {"amx": "yes"}}, "hardware.cpu.amx"),
    ({"cpu": {"physical_cores": 16, "logical_cores": 8}}, "logical_cores"),
    ({"ram_gib": "lots"}, "hardware.ram_gib"),
    ({"ram_gib": 64, "ram_available_gib": 128}, "ram_available"),
    ({"disk": 1}, "hardware.disk"),
    ({"gpu": 8}, "hardware.gpu"),
])
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve_hardware(overrides, detected=BASE)


def test_gpu_count_without_memory_needs_a_detected_gpu():
    bare = Hardware(gpus=(), cpu=BASE.cpu, ram_bytes=BASE.ram_bytes, ram_available_bytes=BASE.ram_available_bytes)
    with pytest.raises(ConfigError, match="memory_gib"):
        resolve_hardware({"gpu": {"count": 8}}, detected=bare)
    assert len(resolve_hardware({"gpu": {"count": 8, "memory_gb": 48}}, detected=bare).gpus) == 8


def test_cuda_visible_devices_selects_gpus(tmp_path, monkeypatch):
    proc, sys = _fake_host(tmp_path)
    probe = lambda: [GpuInfo(i, f"G{i}", 10 * GIB, 9 * GIB, GIB) for i in range(4)]  # noqa: E731
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    hw = detect_hardware(probe=probe, proc_root=proc, sys_root=sys)
    assert [(g.index, g.name) for g in hw.gpus] == [(0, "G3"), (1, "G1")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-uuid-a")
    assert len(detect_hardware(probe=probe, proc_root=proc, sys_root=sys).gpus) == 4
