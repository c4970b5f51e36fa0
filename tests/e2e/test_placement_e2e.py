"""Record, then place, end to end: `kttune run` on the placement space against the real
simulated server (`python -m tuner.sim`, HTTP recorder endpoints, the dump written where
SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR points) with the REAL sglang.bench_serving client,
then `kttune export` with the tuned environment variable as a comment block."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, requires_bench_client
from tests.e2e.test_run_e2e import kttune, load, marker, study_args
from tuner.config import EXPERT_LOCATION_FLAG, PLACEMENT_FLAG
from tuner.storage.attrs import ATTR_FLAGS, ATTR_LAUNCHED, ATTR_REASON, STUDY_ATTR_EXPERT_DISTRIBUTION

pytestmark = [pytest.mark.e2e, requires_bench_client]
SPACE = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20-placement.yaml"


def test_a_study_records_once_and_frequency_trials_read_the_dump(tmp_path: Path) -> None:
    data = yaml.safe_load(SPACE.read_text())
    data["server"]["args"].update({"sim-time-scale": 0.005, "served-model-name": marker(tmp_path)})
    data["bench"]["time_scale"] = 0.005
    data["workloads"]["chat"] = {"num_prompts": 8, "input_len": 256, "output_len": 32}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    res = kttune("run", *study_args(tmp_path, space), "--budget", "3", "--seed", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    study = load(tmp_path)
    dump = Path(study.user_attrs[STUDY_ATTR_EXPERT_DISTRIBUTION])
    assert dump.is_file() and dump.name.startswith("expert_distribution_recorder_")
    first = min((t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)), key=lambda t: t.number)
    assert f"Write expert distribution to {dump}" in (Path(first.user_attrs["trial_dir"]) / "server.log").read_text()
    freq = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED) and t.params[PLACEMENT_FLAG] == "frequency"]
    assert freq and all(t.user_attrs[ATTR_FLAGS][EXPERT_LOCATION_FLAG] == str(dump) for t in freq)
    assert all(t.user_attrs.get(ATTR_REASON) is None for t in freq)
    log = (Path(freq[0].user_attrs["trial_dir"]) / "server.log").read_text()
    assert "Using frequency-based strategy with activation frequency data" in log
    out = tmp_path / "best.yaml"
    res = kttune("export", *study_args(tmp_path, space), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    text = out.read_text()
    assert "# launch with: KT_RAWINT4_BACKEND=" in text and "env:" not in yaml.safe_load(text)
