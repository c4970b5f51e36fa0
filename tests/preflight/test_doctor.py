"""`kttune doctor` on this CPU-only machine: a full table, no crash, and each check's verdict."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import requires_bench_client
from tuner.cli import main
from tuner.preflight.doctor import FAIL, OK, SKIP, WARN, DoctorOptions, ProcResult, exit_code, render_checks, run_checks

SIM = "search_spaces/sim-kimi-k2-thinking-8xl20.yaml"
REAL = "search_spaces/kimi-k2-thinking-8xl20.yaml"


def rows(checks) -> dict[str, object]:
    return {c.name: c for c in checks}


@requires_bench_client
def test_sim_space_is_ready_here(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["doctor", "--space", SIM, "--studies-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ready to run" in out and "0 failed" in out
    for name, status in (("server: simulator", "ok"), ("server flags", "ok"), ("bench: sglang", "ok"),
                         ("bench flags", "ok"), ("GPUs", "skip"), ("model config.json", "ok"), ("tokenizer", "ok"),
                         ("bench dataset", "ok"), ("storage", "ok")):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert line.split()[len(name.split())] == status, line


def test_real_space_on_this_machine_fails_cleanly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["doctor", "--space", REAL, "--studies-dir", str(tmp_path), "--timeout", "60"]) == 1
    out = capsys.readouterr().out
    for name in ("server: sglang", "GPUs", "model config.json", "bench dataset"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert " FAIL " in line, line
    assert "→ fix:" in out and "failed" in out.splitlines()[-1]


def test_without_a_space_checks_this_python_and_machine(tmp_path: Path) -> None:
    checks = rows(run_checks(DoctorOptions(studies_dir=tmp_path), probe_gpus=lambda: []))
    assert {"sglang (this python)", "kt_kernel (this python)", "GPUs", "CPU", "storage"} <= set(checks)
    assert checks["CPU"].status == OK and checks["storage"].status == SKIP


def fake_runner(help_text: str, modules_ok: bool = True):
    calls: list[list[str]] = []

    def run(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> ProcResult:
        calls.append(list(argv))
        if argv[-1] == "--help":
            return ProcResult(0, help_text)
        mods = {m: ({"ok": True, "version": "0.7.2", "dists": []} if modules_ok else {"ok": False, "error": "boom"})
                for m in argv[3:]}
        return ProcResult(0, "noise\nKTTUNE_PROBE " + json.dumps({"python": "3.11", "executable": argv[0], "modules": mods}))

    return run, calls


def real_space_file(tmp_path: Path, **server_changes: object) -> Path:
    data = yaml.safe_load(Path(REAL).read_text())
    data["server"].update(server_changes)
    data["server"]["args"]["model-path"] = "tuner/sim/models/kimi-k2-thinking"
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_flags_missing_from_help_are_named(tmp_path: Path) -> None:
    space = real_space_file(tmp_path)
    flags = yaml.safe_load(space.read_text())["server"]["args"]
    help_text = "usage: x [-h]\n" + " ".join(f"--{f}" for f in flags if f != "watchdog-timeout") + \
        " --host --port --kt-num-gpu-experts --kt-cpuinfer --kt-threadpool-count --chunked-prefill-size --max-running-requests"
    run, calls = fake_runner(help_text)
    checks = rows(run_checks(DoctorOptions(space_path=str(space), studies_dir=tmp_path), run=run, probe_gpus=lambda: []))
    assert checks["server flags"].status == FAIL and "--watchdog-timeout" in checks["server flags"].detail
    assert checks["server: sglang"].status == OK and "0.7.2" in checks["server: sglang"].detail
    assert checks["server: kt_kernel"].status == OK
    assert checks["model config.json"].status == OK and "384 experts" in checks["model config.json"].detail
    assert any(c[-1] == "--help" and "sglang.launch_server" in c for c in calls)


def test_failed_imports_and_gpus(tmp_path: Path) -> None:
    run, _ = fake_runner("usage: x [-h]", modules_ok=False)
    gib = 1 << 30
    gpus = [SimpleNamespace(index=i, name="NVIDIA L20", total_bytes=48 * gib, free_bytes=47 * gib) for i in range(4)]
    checks = rows(run_checks(DoctorOptions(space_path=str(real_space_file(tmp_path)), studies_dir=tmp_path),
                             run=run, probe_gpus=lambda: gpus))
    assert checks["server: sglang"].status == FAIL and "boom" in checks["server: sglang"].detail
    assert checks["server flags"].status in (WARN, FAIL)
    assert checks["GPUs"].status == FAIL and "tensor-parallel-size is 8" in checks["GPUs"].fix  # 4 GPUs for TP8
    assert checks["GPU memory free"].status == OK


def test_a_hanging_interpreter_times_out(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    started = time.monotonic()
    checks = rows(run_checks(DoctorOptions(space_path=str(real_space_file(tmp_path, python=str(fake))),
                                           studies_dir=tmp_path, timeout_s=0.5), probe_gpus=lambda: []))
    assert time.monotonic() - started < 15
    assert checks["server: sglang"].status == FAIL and "timed out" in checks["server: sglang"].detail
    assert checks["server flags"].status == WARN and "timed out" in checks["server flags"].detail


def test_unreachable_storage_is_a_row_not_a_crash(tmp_path: Path) -> None:
    checks = rows(run_checks(DoctorOptions(study="x", storage="postgresql://u@127.0.0.1:1/db", studies_dir=tmp_path),
                             probe_gpus=lambda: []))
    assert checks["storage"].status == FAIL and checks["storage"].fix
    ok = rows(run_checks(DoctorOptions(study="x", storage=f"sqlite:///{tmp_path}/a/b.db", studies_dir=tmp_path),
                         probe_gpus=lambda: []))
    assert ok["storage"].status == OK and "not created yet" in ok["storage"].detail
    assert not (tmp_path / "a").exists()  # doctor creates nothing


def test_render_and_exit_code() -> None:
    from tuner.preflight.doctor import Check

    checks = [Check("a", OK, "fine"), Check("b", FAIL, "broken", "do this"), Check("c", WARN, "hm", "maybe that")]
    text = render_checks(checks)
    assert "→ fix: do this" in text and "→ fix: maybe that" in text and "1 failed, 1 warnings" in text
    assert exit_code(checks) == 1 and exit_code(checks[:1]) == 0
