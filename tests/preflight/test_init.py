"""`kttune init` on each shipped model config, for the machine its simulator scenario describes:
the written space loads unchanged in `kttune plan` and `kttune run --dry-run`, its ranges
come from the feasibility model; bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, requires_bench_client
from tuner.preflight.init import InitOptions, build_space, find_interpreters, parse_gpus

MODELS = sorted(p.name for p in (REPO / "tuner" / "sim" / "models").iterdir() if (p / "config.json").is_file())


def kttune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def machine_flags(model: str) -> list[str]:
    """The `hardware:` block of the first shipped simulator space of `model`, as init's flags."""
    for path in sorted((REPO / "search_spaces").glob("sim-*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data["server"]["args"]["model-path"].endswith(f"/{model}"):
            hw: dict[str, Any] = data["hardware"]
            gpu, cpu = hw["gpu"], hw["cpu"]
            memory = f"{gpu['memory_mib']}MiB" if "memory_mib" in gpu else f"{gpu['memory_gib']}G"
            return ["--gpus", f"{gpu['count']}x {gpu['name']}-{memory}",
                    "--cpu", f"{cpu['sockets']}x{cpu['cores_per_socket']}", "--numa-nodes", str(cpu["numa_nodes"]),
                    "--amx" if cpu.get("amx") else "--no-amx", "--ram-gib", str(hw["ram_gib"])]
    raise AssertionError(f"no shipped simulator space uses {model}")


@pytest.mark.parametrize("model", MODELS)
def test_init_writes_a_space_that_plan_and_the_dry_run_accept(tmp_path: Path, model: str) -> None:
    out = tmp_path / f"{model}.yaml"
    res = kttune("init", "--model", str(REPO / "tuner" / "sim" / "models" / model), *machine_flags(model),
                 "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout and "kt-num-gpu-experts 0.." in res.stdout
    space = yaml.safe_load(out.read_text())
    experts = space["params"]["kt-num-gpu-experts"]
    assert set(space["workloads"]) == {"prefill", "decode"} and space["hardware"]["gpu"]["count"] >= 1
    plan = kttune("plan", "--space", str(out))
    assert plan.returncode == 0, plan.stdout + plan.stderr  # the baseline fits
    largest = int(plan.stdout.rsplit("fits with these settings: ", 1)[1].split()[0])
    assert space["baseline"]["kt-num-gpu-experts"] <= largest
    loosest = kttune("plan", "--space", str(out), "--set", "kt-num-gpu-experts=0", "--set", "chunked-prefill-size=1024",
                     "--set", "max-running-requests=8")
    boundary = int(loosest.stdout.rsplit("fits with these settings: ", 1)[1].split()[0])
    assert experts["high"] <= boundary < experts["high"] + experts["step"]  # the range ends on the boundary
    cores = space["hardware"]["cpu"]["sockets"] * space["hardware"]["cpu"]["cores_per_socket"]
    cpuinfer = space["params"]["kt-cpuinfer"]
    assert cpuinfer["high"] <= cores and cpuinfer["low"] <= space["baseline"]["kt-cpuinfer"] <= cpuinfer["high"]
    pools = (space["params"]["kt-threadpool-count"]["choices"] if "kt-threadpool-count" in space["params"]
             else [space["server"]["args"]["kt-threadpool-count"]])
    assert max(pools) <= space["hardware"]["cpu"]["numa_nodes"]
    dry = kttune("run", "--space", str(out), "--dry-run", "--budget", "3")
    assert dry.returncode == 0, dry.stderr
    servers = [ln for ln in dry.stdout.splitlines() if ln.startswith("  server: ")]
    assert len(servers) == 3 and all("sglang.launch_server" in ln for ln in servers)
    assert not (tmp_path / "studies").exists() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize(("args", "field"), [
    (["--gpus", "lots of H100"], "--gpus"),
    (["--gpus", "8x L20-48G", "--cpu", "many"], "--cpu"),
    (["--gpus", "8x L20-48G", "--numa-nodes", "2"], "--cpu"),
    (["--numa-nodes", "2"], "--numa-nodes"),
    (["--gpus", "8x L20-48G", "--cpu", "2x32"], "--ram-gib"),
    (["--cpu", "2x32", "--ram-gib", "1024"], "--gpus"),
    (["--gpus", "8x L20", "--cpu", "2x32", "--ram-gib", "1024"], "--gpus"),
    (["--gpus", "8x L20-48G", "--cpu", "2x32", "--numa-nodes", "0", "--ram-gib", "1024"], "--numa-nodes"),
    (["--gpus", "1x RTX4090-24G", "--cpu", "1x24", "--amx", "--ram-gib", "16"], "--model"),  # Kimi-K2 on one 4090
])
def test_bad_machine_descriptions_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], field: str) -> None:
    res = kttune("init", "--model", str(REPO / "tuner" / "sim" / "models" / "kimi-k2-thinking"), *args,
                 "--out", str(tmp_path / "x.yaml"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"kttune: error: {field}") and not list(tmp_path.iterdir())


def test_init_refuses_a_folder_without_config_json_and_an_existing_out(tmp_path: Path) -> None:
    res = kttune("init", "--model", str(tmp_path), "--gpus", "1x L20-48G")
    assert res.returncode == 2 and "config.json" in res.stderr
    out = tmp_path / "x.yaml"
    out.write_text("mine\n")
    res = kttune("init", "--model", str(REPO / "tuner" / "sim" / "models" / "qwen3-30b-a3b"),
                 *machine_flags("qwen3-30b-a3b"), "--out", str(out))
    assert res.returncode == 2 and "--force" in res.stderr and out.read_text() == "mine\n"


def test_gpu_descriptions() -> None:
    assert parse_gpus("8x L20-48G") == {"count": 8, "name": "L20", "memory_gib": 48}
    assert parse_gpus("4 x NVIDIA H100 80GB HBM3-81559MiB") == {"count": 4, "name": "NVIDIA H100 80GB HBM3",
                                                                "memory_mib": 81559}
    assert parse_gpus("2x A6000") == {"count": 2, "name": "A6000"}


def test_interpreters_come_from_path_and_the_seed_rule_sets_cpuinfer() -> None:
    result = build_space(InitOptions(model=str(REPO / "tuner" / "sim" / "models" / "kimi-k2-thinking"),
                                     gpus="8x L20-46068MiB", cpu="2x32", amx=True, ram_gib=1024),
                         interpreters=(["/opt/kt/bin/python"], ["/opt/bench/bin/python"]))
    data = result.data
    assert data["server"]["python"] == "/opt/kt/bin/python" and data["bench"]["python"] == "/opt/bench/bin/python"
    assert data["baseline"]["kt-cpuinfer"] == 64 - 8  # physical cores − GPU ranks
    assert data["server"]["args"]["tensor-parallel-size"] == 8 and data["params"]["kt-threadpool-count"] == {"choices": [1, 2]}


@requires_bench_client
def test_interpreters_on_path_are_the_ones_that_have_the_module() -> None:
    bench_dir = str(REPO / ".venv-bench" / "bin")
    found = find_interpreters(["sglang.bench_serving"], 60, path=os.pathsep.join([bench_dir, "/usr/bin"]))
    assert found and Path(found[0]).parent == Path(bench_dir)
    assert find_interpreters(["no_such_module_kttune"], 60, path=bench_dir) == []


KIMI = REPO / "tuner" / "sim" / "models" / "kimi-k2-thinking"


def test_a_described_machine_takes_no_cpu_feature_or_ram_from_this_host(tmp_path: Path) -> None:
    """Nothing of the host leaks into a described machine: AMX and AVX-512 default to absent,
    said on screen, so the AMXINT4 default is refused (the host here may well have AVX-512)."""
    described = ["--gpus", "8x L20-46068MiB", "--cpu", "2x32", "--ram-gib", "1024"]
    res = kttune("init", "--model", str(KIMI), *described, "--out", str(tmp_path / "a.yaml"))
    assert res.returncode == 2 and res.stderr.startswith("kttune: error: --kt-method: the described CPU")
    assert "--amx" in res.stderr and not list(tmp_path.iterdir())
    out = tmp_path / "k.yaml"
    res = kttune("init", "--model", str(KIMI), *described, "--kt-method", "LLAMAFILE", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "AMX: not described, assumed absent" in res.stdout and "AVX-512: not described" in res.stdout
    assert "[described]" in res.stdout
    space = yaml.safe_load(out.read_text())
    assert space["hardware"]["cpu"]["amx"] is False and space["hardware"]["cpu"]["avx512"] is False
    assert space["hardware"]["ram_gib"] == 1024 and space["server"]["args"]["kt-method"] == "LLAMAFILE"
    plan = kttune("plan", "--space", str(out))
    assert "AMX no" in plan.stdout and "cpu_isa_missing" not in plan.stdout.split("VIOLATED")[0].splitlines()[-1]
    amx = tmp_path / "amx.yaml"
    res = kttune("init", "--model", str(KIMI), *described, "--amx", "--out", str(amx))
    assert res.returncode == 0 and "assumed absent" not in res.stdout
    written = yaml.safe_load(amx.read_text())
    assert written["server"]["args"]["kt-method"] == "AMXINT4" and written["hardware"]["cpu"]["avx512"] is True


def test_build_space_ignores_the_detected_host_for_a_described_machine() -> None:
    from tuner.machine.hardware import CpuSpec, GpuSpec, Hardware

    host = Hardware(gpus=(GpuSpec(0, "H100", 80 << 30, 80 << 30),),
                    cpu=CpuSpec("host", 2, 112, 224, 2, (56, 56), amx=True, avx512=True),
                    ram_bytes=4096 << 30, ram_available_bytes=4096 << 30)
    opts = InitOptions(model=str(KIMI), gpus="8x L20-46068MiB", cpu="2x32", ram_gib=1024, kt_method="LLAMAFILE")
    data = build_space(opts, interpreters=([], []), detected=host).data
    assert data["hardware"]["cpu"] == {"sockets": 2, "cores_per_socket": 32, "threads_per_core": 2, "numa_nodes": 2,
                                       "amx": False, "avx512": False}


def _bound(line: str) -> tuple[int, dict[str, str]]:
    """"185 at chunked-prefill-size 4096, max-running-requests 37" → 185 and the settings."""
    n, _, where = line.strip().partition(" at ")
    settings = dict(part.strip().split(" ", 1) for part in where.split("(")[0].split(","))
    return int(n), settings


def test_init_and_plan_give_one_answer_and_say_at_which_settings(tmp_path: Path) -> None:
    out = tmp_path / "k.yaml"
    res = kttune("init", "--model", str(KIMI), "--gpus", "8x L20-46068MiB", "--cpu", "2x32", "--amx",
                 "--ram-gib", "1024", "--out", str(out))
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "(the space's loosest)" in ln)
    loosest, at_base = line.split("(the space's loosest), ")
    space = yaml.safe_load(out.read_text())
    assert space["server"]["args"]["watchdog-timeout"] == 3000  # slow CPU prefill outlasts SGLang's 300 s
    experts = space["params"]["kt-num-gpu-experts"]
    for text in (loosest, at_base.replace("at the baseline's", "at")):
        n, settings = _bound(text)
        sets = [f"{flag}={value}" for flag, value in settings.items()]
        assert space["baseline"]["kt-num-gpu-experts"] <= n and experts["high"] <= _bound(loosest)[0]
        for count, verdict in ((n, ": fits"), (n + 1, "DOES NOT FIT")):
            plan = kttune("plan", "--space", str(out), "--set", f"kt-num-gpu-experts={count}",
                          *[a for s in sets for a in ("--set", s)])
            assert verdict in plan.stdout.splitlines()[0], plan.stdout
            assert f"fits with these settings: {n} (at {text.split(' at ', 1)[1].split(' (')[0].strip()})" in plan.stdout
    assert experts["high"] > _bound(loosest)[0] - experts["step"]  # the range ends on the last grid point that fits
