from __future__ import annotations

import pytest
import yaml
from optuna.trial import TrialState

from tuner import outcome as objective
from tuner.config import parse_space


def space(**changes):
    data = yaml.safe_load(open("search_spaces/sim-kimi-k2-thinking-8xl20.yaml").read())
    data.update(changes)
    return parse_space(data, check_paths=False)


def test_success_takes_the_objective_metric() -> None:
    out = objective.success(space(), {"decode.output_throughput": 45.9, "prefill.input_throughput": 570.0}, {})
    assert out.state == TrialState.COMPLETE and out.values == [45.9] and out.constraints == {"launch_failed": 0.0}


def test_missing_metric_is_a_named_infrastructure_failure() -> None:
    out = objective.success(space(), {"prefill.input_throughput": 570.0}, {})
    assert out.state == TrialState.FAIL and out.reason == "metric_missing" and "decode.output_throughput" in out.message


@pytest.mark.parametrize("reason", ["oom", "oom_weights", "kv_not_enough_memory", "start_timeout", "server_died",
                                    "exited_rc_139"])
def test_config_faults_teach_the_sampler(reason: str) -> None:
    out = objective.failure(space(), reason, "x")
    assert out.state == TrialState.COMPLETE and out.values == [0.0] and out.constraints["launch_failed"] == 1.0


@pytest.mark.parametrize("reason", ["port_in_use", "bench_no_result", "interrupted", "teardown_stuck"])
def test_infrastructure_faults_are_fail(reason: str) -> None:
    out = objective.failure(space(), reason, "x")
    assert out.state == TrialState.FAIL and out.values is None


def test_predicted_infeasible_keeps_its_graded_constraints() -> None:
    out = objective.failure(space(), "infeasible_predicted", "x", constraints={"gpu_mem_startup_gb": 3.5})
    assert out.constraints == {"gpu_mem_startup_gb": 3.5, "launch_failed": 0.0}


def test_slo_violations_are_constraints_and_minimize_is_pessimistic_high() -> None:
    sp = space(slo=["decode.median_itl_ms <= 800"],
               objective=[{"workload": "decode", "metric": "median_itl_ms", "direction": "minimize"}])
    out = objective.success(sp, {"decode.median_itl_ms": 880.0}, {})
    assert out.constraints["slo:decode.median_itl_ms"] == pytest.approx(0.1)
    assert objective.failure(sp, "oom", "x").values == [objective.PESSIMISTIC_MIN]


def test_plan_prints_breakdown_layout_and_largest_n(capsys) -> None:
    from tuner.cli import main

    rc = main(["plan", "--space", "search_spaces/sim-kimi-k2-thinking-8xl20.yaml", "--set", "kt-num-gpu-experts=400"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out and "gpu_experts" in out
    assert "56 kt-cpuinfer threads in 2 pool(s)" in out
    n = int(out.rsplit("fits with these settings: ", 1)[1].split()[0])
    assert 150 < n < 240
    rc = main(["plan", "--space", "search_spaces/sim-kimi-k2-thinking-8xl20.yaml", "--set", f"kt-num-gpu-experts={n}"])
    assert rc == 0 and ": fits" in capsys.readouterr().out


def test_plan_bad_set_is_exit_2(capsys) -> None:
    from tuner.cli import main

    assert main(["plan", "--space", "search_spaces/sim-kimi-k2-thinking-8xl20.yaml", "--set", "nonsense"]) == 2
    assert "--set" in capsys.readouterr().err


def test_environment_faults_of_any_kind_in_a_row_stop_the_run() -> None:
    cause = objective.stop_cause([None, "bench_no_result", "port_in_use", "stalled"])
    assert cause is not None and "3 environment faults in a row" in cause and "port_in_use" in cause
    assert objective.stop_cause(["bench_no_result", None, "bench_no_result"]) is None
    assert objective.stop_cause(["unhealthy", "metric_missing"], streak=2) is not None
    assert objective.stop_cause(["unhealthy", "metric_missing"], streak=3) is None


@pytest.mark.parametrize("reason", ["server_died", "quality", "python_exception", "exited_rc_139", "start_timeout"])
def test_one_config_fault_whatever_the_configuration_stops_the_run(reason: str) -> None:
    assert objective.stop_cause([reason] * 3) is not None
    assert objective.stop_cause([reason, "scheduler_dead", reason]) is None  # different faults: configurations


@pytest.mark.parametrize("reason", ["oom", "oom_weights", "kv_not_enough_memory", "request_too_long"])
def test_boundary_faults_repeat_while_exploring_and_never_stop_the_run(reason: str) -> None:
    assert objective.stop_cause([reason] * 6) is None


def test_proposals_that_were_not_launched_neither_extend_nor_break_a_streak() -> None:
    assert objective.stop_cause(["stalled", "infeasible_predicted", "stalled", "duplicate", "stalled"]) is not None
    assert objective.stop_cause(["stalled", "pruned", "stalled", "stalled"]) is None


@pytest.mark.parametrize("reason", ["stalled", "unhealthy"])
def test_hangs_without_evidence_are_environment_faults(reason: str) -> None:
    assert objective.fault_of(reason) is objective.Fault.INFRA
    assert objective.failure(space(), reason, "x").state == TrialState.FAIL
