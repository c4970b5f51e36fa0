"""kt-kernel's real CPU MoE kernels through kttune's worker (the .venv-kt of scripts/setup.sh):
a tiny layer against a float32 torch reference on whatever variant this CPU loads, the
forced AVX2 variant, a real sweep, and the one-line refusals. Under CI=true a missing .venv-kt
fails instead of skipping."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuner.cpubench import CpuBenchUnavailable, Shape, SweepPlan, Worker, load, run_sweep
from tuner.cpubench.sweep import probe, run_process, tagged

REPO = Path(__file__).resolve().parents[2]
KT_PYTHON = Path(os.environ.get("KTTUNE_KT_PYTHON", REPO / ".venv-kt" / "bin" / "python"))


def _has_kt() -> bool:
    return KT_PYTHON.exists() and subprocess.run([str(KT_PYTHON), "-c", "import kt_kernel"], capture_output=True).returncode == 0


if not _has_kt():
    if os.environ.get("CI"):
        pytest.fail(f"kt-kernel is not importable from {KT_PYTHON}: scripts/setup.sh makes .venv-kt", pytrace=False)
    pytestmark = pytest.mark.skip(reason=f"no kt-kernel at {KT_PYTHON}: run scripts/setup.sh")

# A shape seen to run on AMX as well as AVX-512 (kt-kernel's kernels need dims aligned to their tiles).
TINY = {"experts": 8, "top_k": 2, "hidden": 1024, "inter": 512, "threads": 1, "pools": 1, "max_len": 16, "batches": [1, 5, 16]}
#: Cosine to the float32 reference a kernel must reach (seen: INT8 0.9997, INT4 0.97-0.98, BF16 0.99999).
MIN_COSINE = {"AMXINT8": 0.999, "AMXINT4": 0.95, "BF16": 0.9999}


def _check(method: str, env: dict[str, str] | None = None) -> list[dict]:
    worker = Worker.kt_kernel(str(KT_PYTHON), env)
    rc, out = worker.call("check", {**TINY, "method": method}, 300, run_process)
    lines = tagged(out)
    assert rc == 0, out[-2000:]
    return [x for x in lines if x.get("kind") == "check"]


def _variant(env: dict[str, str] | None = None) -> dict:
    return probe(Worker.kt_kernel(str(KT_PYTHON), env), "BF16")


@pytest.mark.parametrize("method", ["AMXINT8", "AMXINT4", "BF16"])
def test_tiny_layer_matches_torch_reference_on_this_cpu(method: str) -> None:
    info = _variant()
    try:
        probe(Worker.kt_kernel(str(KT_PYTHON)), method)
    except CpuBenchUnavailable:
        assert info["variant"] == "avx2", f"{method} missing on the {info['variant']} build"
        pytest.skip(f"{method} has no kernel in kt-kernel's avx2 build (this CPU has no AVX-512)")
    checks = _check(method)
    assert [c["batch"] for c in checks] == TINY["batches"]
    for c in checks:
        assert c["finite"] and c["cosine"] >= MIN_COSINE[method], (info["variant"], c)


def test_forced_avx2_variant_runs_bf16_and_refuses_amx_in_one_line() -> None:
    env = {"KT_KERNEL_CPU_VARIANT": "avx2"}
    assert _variant(env)["variant"] == "avx2"
    for c in _check("BF16", env):
        assert c["finite"] and c["cosine"] >= MIN_COSINE["BF16"], c
    with pytest.raises(CpuBenchUnavailable) as err:
        probe(Worker.kt_kernel(str(KT_PYTHON), env), "AMXINT4")
    msg = str(err.value)
    assert "\n" not in msg and "AMXInt4_MOE" in msg and "avx2" in msg and "fix:" in msg


def test_a_real_sweep_aliases_experts_and_times_every_batch(tmp_path: Path) -> None:
    # 64 experts of which 2 are distinct in memory; two subpools split the intermediate dim.
    method = "AMXINT4" if _variant()["variant"] != "avx2" else "BF16"
    plan = SweepPlan(Shape(method, 64, 4, 1024, 512), threads=(1,), pools=(1,), batches=(1, 8, 64), prefill=64,
                     repeats=2, min_time_s=0.2, distinct=2)
    result = run_sweep(Worker.kt_kernel(str(KT_PYTHON)), plan, log=lambda _m: None)
    (point,) = result.points
    assert point.error is None
    assert sorted(point.seconds) == [1, 8, 64] and all(len(s) == 2 and min(s) > 0 for s in point.seconds.values())
    assert result.env["kt_kernel"] and result.env["variant"]


def _real_space(tmp_path: Path, python: str, env: dict[str, str]) -> Path:
    data = yaml.safe_load((REPO / "search_spaces" / "kimi-k2-thinking-8xl20.yaml").read_text())
    data["server"]["python"] = python
    data["server"]["env"] = env
    data["server"]["args"]["model-path"] = str(REPO / "tuner" / "sim" / "models" / "kimi-k2-thinking")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("python,env,needle", [
    (sys.executable, {}, "kt-kernel cannot be imported"),
    (str(KT_PYTHON), {"KT_KERNEL_CPU_VARIANT": "avx2"}, "no AMXInt4_MOE"),
])
def test_cli_refuses_in_one_line_exit_2_and_writes_nothing(tmp_path: Path, python: str, env: dict[str, str],
                                                           needle: str) -> None:
    space = _real_space(tmp_path, python, env)
    res = subprocess.run([sys.executable, "-m", "tuner.cli", "cpubench", "--space", str(space), "--studies-dir",
                          str(tmp_path / "studies")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "fix:" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "studies").exists()
    assert load(tmp_path / "studies" / "kimi-k2-thinking-8xl20" / "cpubench") is None
    json.dumps(lines)  # plain text


def test_python_m_tuner_cpubench_runs_in_the_kernels_python_without_kttunes_dependencies(tmp_path: Path) -> None:
    # .venv-kt has no optuna, yaml or matplotlib: the serving machine's Python need not either.
    method = "AMXINT4" if _variant()["variant"] != "avx2" else "BF16"
    res = subprocess.run([str(KT_PYTHON), "-m", "tuner.cpubench", "--method", method, "--experts", "32", "--top-k", "4",
                          "--hidden", "1024", "--inter", "512", "--threads", "1", "--batches", "1,8,32", "--repeats", "2",
                          "--min-time", "0.2", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = load(tmp_path / "out")
    assert result is not None and result.ok_points() and result.plan.prefill == 32
    assert "tokens/s of one layer" in (tmp_path / "out" / "table.txt").read_text()
