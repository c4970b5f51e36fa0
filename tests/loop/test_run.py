from __future__ import annotations

from pathlib import Path

import pytest
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


def test_a_launch_that_never_started_a_server_spends_no_budget(tmp_path: Path) -> None:
    import optuna

    from tests.search.test_sampler import sim_space
    from tuner.loop.run import RunOptions, StudyStopped, run_study
    from tuner.outcome import failure
    from tuner.sim.inprocess import InProcessRunner
    from tuner.storage.attrs import ATTR_LAUNCHED, ATTR_REASON
    from tuner.trial import TrialRun

    space = sim_space("qwen3-30b-a3b-1x4090")
    inner = InProcessRunner(noise_sigma=0.0)
    taken = {"left": 2}

    def runner(space, flags, trial_dir, *, on_phase=None):  # the port is taken for the first launches
        if taken["left"]:
            taken["left"] -= 1
            return TrialRun(outcome=failure(space, "port_in_use", "port 30000 is already in use before launch"),
                            argv=[], trial_dir=trial_dir, started=False)
        return inner(space, flags, trial_dir, on_phase=on_phase)

    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="s", storage=storage, budget=3, seed=0, studies_dir=tmp_path, check_feasibility=False)
    summary = run_study(space, opts, log=lambda _m: None, runner=runner)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    refused = [t for t in trials if t.user_attrs.get(ATTR_REASON) == "port_in_use"]
    assert summary.launched == 3 and len(refused) == 2
    assert not any(t.user_attrs.get(ATTR_LAUNCHED) for t in refused)
    assert sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED)) == 3
    taken["left"] = 5  # a port taken for good: bounded retries, then the study stops
    opts = RunOptions(study_name="t", storage=storage, budget=3, seed=0, studies_dir=tmp_path, check_feasibility=False)
    try:
        run_study(space, opts, log=lambda _m: None, runner=runner)
    except StudyStopped as exc:
        assert "port_in_use" in str(exc)
    else:
        raise AssertionError("a port taken for good must stop the study")


def test_a_run_in_which_nothing_is_measured_says_so(tmp_path: Path) -> None:
    import optuna

    from tests.search.test_sampler import sim_space
    from tuner.loop.run import RunOptions, run_study
    from tuner.outcome import failure
    from tuner.trial import TrialRun

    space = sim_space("qwen3-30b-a3b-1x4090")

    def oom(space, flags, trial_dir, *, on_phase=None):  # every launch runs out of memory: a boundary
        return TrialRun(outcome=failure(space, "oom_weights", "CUDA out of memory"), argv=[], trial_dir=trial_dir)

    opts = RunOptions(study_name="s", storage=optuna.storages.InMemoryStorage(), budget=4, seed=0,
                      studies_dir=tmp_path, check_feasibility=False)
    summary = run_study(space, opts, log=lambda _m: None, runner=oom)
    assert summary.launched == 4 and summary.measured == 0 and summary.stopped_reason is None


def test_cli_documents_exit_codes_and_checks_the_streak(capsys) -> None:
    from tuner.cli import build_parser, main

    help_text = " ".join(build_parser().format_help().split())
    assert "exit codes: 0 ok" in help_text and "3 the run ended with no trial measured" in help_text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    run_help = " ".join(capsys.readouterr().out.split())
    assert "--fault-streak" in run_help and "3 the run ended with no trial measured" in run_help
    assert main(["run", "--fault-streak", "0"]) == 2
    assert "--fault-streak" in capsys.readouterr().err
