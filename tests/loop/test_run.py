from __future__ import annotations

from pathlib import Path

import yaml

from tuner.cli import main


def test_space_where_nothing_fits_is_refused_before_the_study_exists(tmp_path: Path, capsys) -> None:
    data = yaml.safe_load(open("search_spaces/sim-kimi-k2-thinking-8xl20.yaml").read())
    data["params"]["kt-num-gpu-experts"] = {"low": 260, "high": 384}
    del data["baseline"]
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(data))
    rc = main(["run", "--space", str(space), "--budget", "2", "--storage", f"sqlite:///{tmp_path / 'x.db'}",
               "--studies-dir", str(tmp_path / "st")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "gpu_mem" in err and "lower kt-num-gpu-experts to" in err
    assert not (tmp_path / "x.db").exists()


def test_repeating_environment_fault_stops_but_memory_cliffs_do_not() -> None:
    from tuner.loop.run import repeating_fault

    assert repeating_fault([None, "bench_no_result", "bench_no_result", "bench_no_result"])
    assert repeating_fault(["python_exception"] * 3)
    assert not repeating_fault(["oom"] * 5)
    assert not repeating_fault(["bench_no_result", None, "bench_no_result"])
    assert not repeating_fault([None, None, None])
