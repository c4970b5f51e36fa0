"""`kttune run` and `kttune export` against the simulator in both dialects, with the REAL bench client."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, requires_bench_client
from tests.e2e.test_run_e2e import kttune, launched, load, marker, sim_processes, study_args
from tuner.storage.attrs import ATTR_MEMORY, ATTR_REASON, ATTR_TRIAL_DIR, STUDY_ATTR_CALIBRATION, STUDY_ATTR_SERVER

pytestmark = [pytest.mark.e2e, requires_bench_client]
UPSTREAM_SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090-upstream.yaml"
KT_SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"
MEMORY_LINES = ("Load weight", "KV Cache", "graph end", "max_total_num_tokens=", "Memory pool end")


# The memory read-back is judged here, not a measured figure: the fastest scale will do.
def space_file(tmp_path: Path, source: Path, *, scale: float = 0.002, **args: object) -> Path:
    data = yaml.safe_load(source.read_text())
    data["server"]["args"].update({"sim-time-scale": scale, "served-model-name": marker(tmp_path), **args})
    data["bench"]["time_scale"] = scale
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("source", "dialect", "memory_log"), [(UPSTREAM_SPACE, "upstream", False),
                                                               (KT_SPACE, "sglang-kt", True)],
                         ids=["upstream-no-memory-lines", "sglang-kt"])
def test_a_study_reads_memory_back_from_the_server(tmp_path: Path, source: Path, dialect: str, memory_log: bool) -> None:
    space = space_file(tmp_path, source, **({} if memory_log else {"sim-no-memory-log": True}))
    res = kttune("run", *study_args(tmp_path, space), "--budget", "2", "--seed", "0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"server: {dialect}" in res.stdout and "flags checked by its parser" in res.stdout
    study = load(tmp_path)
    assert study.user_attrs[STUDY_ATTR_SERVER]["dialect"] == dialect
    measured = [t for t in launched(study) if t.user_attrs[ATTR_REASON] is None]
    assert measured, [t.user_attrs[ATTR_REASON] for t in launched(study)]
    for t in measured:
        memory = t.user_attrs[ATTR_MEMORY]
        log = (Path(t.user_attrs[ATTR_TRIAL_DIR]) / "server.log").read_text()
        assert memory["server_info_endpoint"] == "/server_info" and memory["kv_tokens"] > 0
        assert any(m in log for m in MEMORY_LINES) is memory_log
        if not memory_log:  # everything came from the read-back
            assert "weight_begin_avail_gib" not in memory and memory["available_gpu_mem_gib"] > 0
    calibration = study.user_attrs[STUDY_ATTR_CALIBRATION]["calibration"]
    # Anchored on a launch: the reference's free memory is an observed figure, not the model's.
    assert calibration["reference_tp"] == 1 and calibration["free_before_weights_gb"] is not None
    assert sim_processes(marker(tmp_path)) == []

    out = tmp_path / "best.yaml"
    exp = kttune("export", *study_args(tmp_path, space), "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    assert f"accepted by {dialect}" in exp.stdout and "--config merger and argument parser" in exp.stdout
    assert not any(str(k).startswith("sim-") for k in yaml.safe_load(out.read_text()))


def test_a_placement_flag_against_an_upstream_server_is_refused_before_any_launch(tmp_path: Path) -> None:
    space = space_file(tmp_path, UPSTREAM_SPACE)
    data = yaml.safe_load(space.read_text())
    data["params"]["kt-expert-placement-strategy"] = {"choices": ["uniform", "frequency"]}
    data["baseline"]["kt-expert-placement-strategy"] = "uniform"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    res = kttune("run", *study_args(tmp_path, space), "--budget", "2")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "--kt-expert-placement-strategy" in res.stderr and "upstream sglang 0.5.23" in res.stderr
    assert not (tmp_path / "e2e.db").exists() and not (tmp_path / "studies").exists()
    assert sim_processes(marker(tmp_path)) == []
