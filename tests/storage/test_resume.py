"""Resuming a study with a changed space: refused with the difference named (nothing written),
or accepted with one line per change when the finished trials stay valid."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from tests.conftest import REPO
from tests.test_cli_bad_input import assert_refused, tree_digest
from tuner.config import parse_space
from tuner.errors import ConfigError
from tuner.loop.run import RunOptions, run_study
from tuner.sim.inprocess import InProcessRunner
from tuner.storage.attrs import STUDY_ATTR_SPACE

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"
STUDY = "sim-qwen3-30b-a3b-1x4090"


def raw() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(SPACE.read_text()))


def run(data: dict[str, Any], db: Path, budget: int, log: Callable[[str], None] = lambda _m: None) -> None:
    space = parse_space(data, path=SPACE, check_paths=False)
    opts = RunOptions(study_name=STUDY, storage=f"sqlite:///{db}", budget=budget, seed=0, studies_dir=db.parent,
                      check_feasibility=False)
    run_study(space, opts, log=log, runner=InProcessRunner(noise_sigma=0.0))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("resume") / "study.db"
    run(raw(), db, budget=3)
    return db


@pytest.fixture
def db(finished: Path, tmp_path: Path) -> Path:
    copy_ = tmp_path / "study.db"
    shutil.copy(finished, copy_)
    return copy_


def _params(d: dict[str, Any]) -> dict[str, Any]:
    return d["params"]


REFUSED = {
    "objective": (lambda d: d["objective"][0].update({"metric": "total_throughput"}),
                  "was run for decode.output_throughput (maximize), the space asks for decode.total_throughput"),
    "direction": (lambda d: d["objective"][0].update({"metric": "median_itl_ms", "direction": "minimize"}),
                  "decode.median_itl_ms (minimize)"),
    "param added": (lambda d: (_params(d).update({"page-size": {"choices": [1, 16]}}), d["baseline"].update({"page-size": 1})),
                    "params: the space adds page-size"),
    "param removed": (lambda d: (_params(d).pop("kt-threadpool-count"), d["baseline"].pop("kt-threadpool-count"),
                                 d["server"]["args"].update({"kt-threadpool-count": 1})),
                      "params: the space drops kt-threadpool-count"),
    "choices changed": (lambda d: _params(d).update({"chunked-prefill-size": {"choices": [2048, 4096]}}),
                        "params.chunked-prefill-size changed from choices [1024, 2048, 4096, 8192] to choices [2048, 4096]"),
    "int to float": (lambda d: _params(d).update({"max-running-requests": {"choices": [8, 37, 64]}}),
                     "params.max-running-requests changed from int [8, 64] to choices [8, 37, 64]"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_change_the_finished_trials_cannot_survive_is_refused(db: Path, case: str) -> None:
    mutate, words = REFUSED[case]
    data = raw()
    mutate(data)
    before = tree_digest(db.parent)
    with pytest.raises(ConfigError) as err:
        run(data, db, budget=5)
    assert words in str(err.value) and "another --study" in str(err.value) and "\n" not in str(err.value)
    assert tree_digest(db.parent) == before


def test_a_moved_range_is_accepted_with_a_line_per_change(db: Path) -> None:
    data = raw()
    _params(data)["kt-cpuinfer"] = {"low": 20, "high": 40, "step": 2}
    data["slo"] = ["decode.median_itl_ms <= 900"]
    lines: list[str] = []
    run(data, db, budget=5, log=lines.append)
    notes = [ln for ln in lines if ln.startswith("resuming with a changed space")]
    assert len(notes) == 2, lines
    assert "params.kt-cpuinfer: int [4, 48] step 2 → int [20, 40] step 2; the 3 finished trial(s) keep their results" in notes[0]
    assert "slo: none → decode.median_itl_ms <= 900" in notes[1]
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}")
    assert sum(1 for t in study.trials if t.user_attrs.get("launched")) == 5
    assert study.user_attrs[STUDY_ATTR_SPACE]["params"]["kt-cpuinfer"]["attributes"]["low"] == 20
    new = [t for t in study.trials if t.number >= 3 and "kt-cpuinfer" in t.params]
    assert new and all(20 <= t.params["kt-cpuinfer"] <= 40 for t in new)
    lines.clear()
    run(data, db, budget=5, log=lines.append)  # the same space again: nothing to say
    assert not [ln for ln in lines if ln.startswith("resuming")]


def test_the_cli_refuses_a_changed_space_in_one_line(db: Path, tmp_path: Path) -> None:
    data = raw()
    _params(data).pop("kt-threadpool-count")
    data["baseline"].pop("kt-threadpool-count")
    data["server"]["args"]["kt-threadpool-count"] = 1
    space = tmp_path / "changed.yaml"
    space.write_text(yaml.safe_dump(data))
    before = tree_digest(db.parent)
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "run", "--space", str(space), "--study", STUDY,
                           "--storage", f"sqlite:///{db}", "--studies-dir", str(tmp_path), "--budget", "5", "--no-compat-check"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert_refused(done, "params: the space drops kt-threadpool-count", "another --study")
    after = tree_digest(db.parent)
    after.pop("changed.yaml")
    before.pop("changed.yaml", None)
    assert after == before and not (tmp_path / STUDY).exists()
