"""A secret flag (api-key) reaches the server and appears in nothing kttune writes: not the
database, the trial files (argv, server log, bench results), the export, nor the terminal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, requires_bench_client

SECRET = "sk-kttune-test-5f3e9a1c"


@requires_bench_client
def test_a_secret_is_redacted_everywhere_kttune_writes(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml").read_text())
    data["server"]["args"]["api-key"] = SECRET
    # Where the secret goes is judged here, not a measured figure: the fastest scale will do.
    data["server"]["args"]["sim-time-scale"] = data["bench"]["time_scale"] = 0.002
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    studies = tmp_path / "studies"
    common = ["--space", str(space), "--studies-dir", str(studies)]
    outputs = []
    for args in (["run", "--budget", "1", *common], ["run", "--dry-run", "--budget", "1", *common],
                 ["export", *common, "--out", str(tmp_path / "best.yaml")], ["best", *common]):
        done = subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True,
                              timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout + done.stderr)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != space]
    assert any(p.suffix == ".db" for p in written) and any(p.name == "server.argv.json" for p in written)
    leaks = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
    assert not leaks
    assert not [o for o in outputs if SECRET in o]
    # The server was given the real value: it printed it, and only the copy on disk was redacted.
    log = next(p for p in written if p.name == "server.log").read_text()
    assert "<secret api-key>" in log
    profile = (tmp_path / "best.yaml").read_text()
    assert "left out: api-key (a secret: pass --api-key VALUE on the command line)" in profile
    assert "api-key:" not in profile.replace("# left out: api-key", "")
