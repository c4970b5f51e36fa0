"""`kttune plan` explains its verdict through the real command line: the budget it compares
against with the mem-fraction-static cap, why the KV pool is what it is, and fixes naming only
flags the space can change."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"


def plan(space: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "tuner.cli", "plan", "--space", str(space), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, capture_output=True, timeout=120)


def line(out: str, start: str) -> str:
    return next(ln for ln in out.splitlines() if ln.lstrip().startswith(start))


def test_a_static_cap_verdict_shows_the_cap_and_why_the_kv_pool_is_empty() -> None:
    done = plan(SPACE, "kt-num-gpu-experts=45")  # weights just over mem-fraction-static x available
    assert done.returncode == 1 and "DOES NOT FIT (binding: gpu_mem_static_gb" in done.stdout
    total = float(line(done.stdout, "total").split()[1])
    available = float(line(done.stdout, "available").split()[1])
    cap = line(done.stdout, "static cap")
    assert total > float(cap.split()[2])  # the number the verdict compared is on screen
    assert "mem-fraction-static 0.9 x available, as set" in cap and abs(float(cap.split()[2]) - 0.9 * available) < 0.02
    kv = line(done.stdout, "KV pool:")
    assert kv.startswith("KV pool: 0 tokens") and "fill the mem-fraction-static cap" in kv
    assert "raise mem-fraction-static" in line(done.stdout, "fix:")  # the space sets it: the fix may name it


def test_fixes_name_only_flags_the_space_can_change(tmp_path: Path) -> None:
    data = yaml.safe_load(SPACE.read_text())
    del data["server"]["args"]["mem-fraction-static"]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    done = plan(space, "kt-num-gpu-experts=45")
    assert "sglang's default for this GPU" in line(done.stdout, "static cap")
    fix = line(done.stdout, "fix:")
    assert "kt-num-gpu-experts" in fix and "mem-fraction-static" not in fix
    fits = plan(space, "kt-num-gpu-experts=10")
    assert fits.returncode == 0 and "(sized by max-total-tokens 40000)" in line(fits.stdout, "KV pool:")
