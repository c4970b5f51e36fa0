"""The gate anchored on what launched (simulated) servers logged: after one baseline launch it
accepts what fits, rejects what does not, and tightens after a memory failure."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tuner.config import SearchSpace, load_space
from tuner.feasibility.anchor import anchor_from_observed, calibrate_from_log
from tuner.feasibility.calibration import RENAMED_FIELDS
from tuner.feasibility.gate import DEFAULT_MARGIN_GB, MARGIN_STEP_GB, FeasibilityGate
from tuner.server.logscan import runtime_oom as _runtime_oom
from tuner.sim.inprocess import InProcessRunner

KIMI = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml"
RUNNER = InProcessRunner(noise_sigma=0)  # exact simulator figures, no OOM fuzz


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return load_space(KIMI, check_paths=False)


def launch(space: SearchSpace, gate: FeasibilityGate, params: dict[str, Any], tmp: Path) -> tuple[dict, Any]:
    flags = gate.resolve_auto(space.launch_flags({**space.baseline, **params}))
    run = RUNNER(space, flags, tmp / f"t{RUNNER.launches}")
    return flags, run


def observed_gate(space: SearchSpace, tmp: Path, params: dict[str, Any] | None = None) -> FeasibilityGate:
    gate = FeasibilityGate.for_space(space)
    flags, run = launch(space, gate, params or {}, tmp)
    assert run.outcome.reason is None
    gate.observe(run.log_text(), flags, run.outcome.reason, predicted_fit=gate.check(flags).feasible)
    return gate


def test_nothing_observed_keeps_the_pessimistic_margin(space: SearchSpace) -> None:
    gate = FeasibilityGate.for_space(space)
    rep = gate.check(gate.resolve_auto(space.launch_flags(space.baseline)))
    assert gate.calibration.free_before_weights_gb is None
    assert rep.breakdown_gb["margin"] == pytest.approx(DEFAULT_MARGIN_GB)


def test_prediction_at_the_reference_is_what_it_logged(space: SearchSpace, tmp_path: Path) -> None:
    gate = FeasibilityGate.for_space(space)
    flags, run = launch(space, gate, {}, tmp_path)
    gate.observe(run.log_text(), flags, None, predicted_fit=True)
    obs = calibrate_from_log(run.log_text())
    b = gate.check(flags).breakdown_gb
    assert b["weights_nonexpert"] + b["gpu_experts"] + b["staging"] == pytest.approx(obs["weights_gb"], abs=0.01)
    assert b["cuda_graphs"] == pytest.approx(obs["cuda_graph_gb"], abs=0.01)
    assert b["kv"] == pytest.approx(obs["kv_size_gb"], abs=0.02)
    assert b["available"] == pytest.approx(obs["weights_gb"] + obs["avail_after_weights_gb"], abs=0.01)
    assert b["margin"] == pytest.approx(0.0, abs=0.01)  # no difference from the reference, nothing uncertain
    # The run survived full chunks next to what was left: the activation estimate is bounded by it.
    assert b["activations"] <= obs["available_gpu_mem_gb"] + 1e-6
    # What its forwards take beyond start-up, against which what start-up left is memory to spare
    rep = gate.check(flags)
    assert rep.runtime_need_gb == pytest.approx(b["activations"] + b["layerwise_slot"], abs=0.001)
    assert rep.runtime_need_gb <= obs["available_gpu_mem_gb"] + 1e-6
    assert FeasibilityGate.for_space(space).check(flags).runtime_need_gb is None  # unanchored: no figure


def test_after_the_baseline_accepts_what_fits_and_rejects_what_does_not(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    accepted = rejected_fit = 0
    for n in range(196, 237, 4):
        for chunk in (1024, 4096):
            flags, run = launch(space, gate, {"kt-num-gpu-experts": n, "chunked-prefill-size": chunk}, tmp_path)
            if gate.check(flags).feasible:
                accepted += 1
                assert run.outcome.reason is None, (n, chunk, run.outcome.reason)  # never an accepted crash
            elif run.outcome.reason is None:
                rejected_fit += 1
    assert accepted >= 4
    assert rejected_fit <= 3  # only configs next to the cliff, beyond the difference's uncertainty


def test_runtime_oom_bounds_activations_from_below(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    flags, run = launch(space, gate, {"chunked-prefill-size": 2048}, tmp_path)
    assert gate.check(flags).feasible and run.outcome.reason is None
    log = run.log_text() + "\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB.\n"
    assert _runtime_oom(log) and not _runtime_oom("CUDA out of memory\nKV Cache is allocated. #tokens: 1")
    gate.observe(log, flags, "server_died", predicted_fit=True)
    assert gate.calibration.activation_lower_bytes_per_token is not None
    assert not gate.check(flags).feasible
    assert gate.margin_gb == DEFAULT_MARGIN_GB + MARGIN_STEP_GB


def test_startup_failure_where_fit_was_predicted_tightens(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    flags = gate.resolve_auto(space.launch_flags({**space.baseline, "kt-num-gpu-experts": 204,
                                                          "chunked-prefill-size": 1024}))
    assert gate.check(flags).feasible
    obs = calibrate_from_log(launch(space, gate, {}, tmp_path)[1].log_text())
    gib = (1 << 30) / 1e9
    f0, w = (obs["weights_gb"] + obs["avail_after_weights_gb"]) / gib, obs["weights_gb"] / gib + 0.69  # +4 experts
    log = (f"Load weight end. avail mem={f0 - w:.2f} GB, mem usage={w:.2f} GB.\n"
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 0.04 GiB.")
    gate.observe(log, flags, "oom_kv_alloc", predicted_fit=True)
    assert not gate.check(flags).feasible
    assert gate.calibration.anchor_difference_share > 0.05 or gate.calibration.anchor_extra_gb > 0
    base = gate.resolve_auto(space.launch_flags(space.baseline))
    assert gate.check(base).feasible  # the observed baseline still fits


def test_graph_memory_slope_from_two_launches(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    other = {"max-running-requests": 64}
    flags, run = launch(space, gate, other, tmp_path)
    gate.observe(run.log_text(), flags, run.outcome.reason, predicted_fit=True)
    assert gate.calibration.graph_slope_bytes is not None
    # Predict a third batch size from the two observed ones; compare with what it logs.
    flags, run = launch(space, gate, {"max-running-requests": 16}, tmp_path)
    logged = calibrate_from_log(run.log_text())["cuda_graph_gb"]
    assert gate.check(flags).breakdown_gb["cuda_graphs"] == pytest.approx(logged, abs=0.02)


def test_state_round_trip_keeps_the_anchor(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    fresh = FeasibilityGate.for_space(space)
    fresh.restore(gate.state())
    flags = gate.resolve_auto(space.launch_flags({**space.baseline, "kt-num-gpu-experts": 208}))
    assert fresh.check(flags).constraints == gate.check(flags).constraints
    assert fresh.calibration == gate.calibration


def test_restore_reads_a_state_saved_under_the_old_field_names(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    gate.calibration = dataclasses.replace(gate.calibration, activation_upper_bytes_per_token=1.5e5,
                                           activation_lower_bytes_per_token=0.5e5, anchor_extra_gb=0.3)
    new_to_old = {new: old for old, new in RENAMED_FIELDS.items()}
    state = gate.state()
    old_state = {**state, "calibration": {new_to_old.get(k, k): v for k, v in state["calibration"].items()}}
    assert "f0_gb" in old_state["calibration"] and "free_before_weights_gb" not in old_state["calibration"]
    fresh = FeasibilityGate.for_space(space)
    fresh.restore(old_state)
    assert fresh.calibration == gate.calibration and fresh.state() == state
    flags = gate.resolve_auto(space.launch_flags({**space.baseline, "kt-num-gpu-experts": 208}))
    assert fresh.check(flags).constraints == gate.check(flags).constraints
    # a current name wins over an old one; unknown keys are dropped
    fresh.restore({"calibration": {"f0_gb": 1.0, "free_before_weights_gb": 2.0, "no_such_field": 3}})
    assert fresh.calibration.free_before_weights_gb == 2.0


def test_anchor_ignores_a_log_without_weights(space: SearchSpace) -> None:
    gate = FeasibilityGate.for_space(space)
    cal = anchor_from_observed({}, gate.model, gate.hardware, space.launch_flags(space.baseline))
    assert cal == gate.calibration
    other_tp = dataclasses.replace(cal, reference_tp=4, free_before_weights_gb=10.0)  # an anchor at another TP does not apply
    gate.calibration = other_tp
    assert gate.check(gate.resolve_auto(space.launch_flags(space.baseline))).breakdown_gb["margin"] == DEFAULT_MARGIN_GB


def test_the_reference_itself_failing_grows_the_fixed_margin(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    flags = gate.resolve_auto(space.launch_flags(space.baseline))
    gate.observe("torch.OutOfMemoryError: CUDA out of memory.", flags, "oom", predicted_fit=True)
    assert gate.calibration.anchor_extra_gb > 0 and gate.calibration.anchor_difference_share == pytest.approx(0.05)
    assert not gate.check(flags).feasible


def test_a_failed_first_start_up_is_no_reference(space: SearchSpace) -> None:
    gate = FeasibilityGate.for_space(space)
    flags = gate.resolve_auto(space.launch_flags(space.baseline))
    log = "Load weight end. avail mem=4.00 GB, mem usage=40.00 GB.\ntorch.OutOfMemoryError: CUDA out of memory."
    gate.observe(log, flags, "oom_kv_alloc", predicted_fit=True)
    assert gate.calibration.free_before_weights_gb is None  # still the pessimistic model, with a wider margin
    assert gate.margin_gb == DEFAULT_MARGIN_GB + MARGIN_STEP_GB


def test_free_memory_is_averaged_and_its_spread_kept_free(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    flags = gate.resolve_auto(space.launch_flags(space.baseline))
    obs = calibrate_from_log(launch(space, gate, {}, tmp_path)[1].log_text())
    cal = gate.calibration
    for shift in (-0.4, 0.4):  # two more launches, free memory 0.4 GB lower and higher
        cal = anchor_from_observed({**obs, "avail_after_weights_gb": obs["avail_after_weights_gb"] + shift},
                                   gate.model, gate.hardware, flags, base=cal)
    assert cal.free_before_weights_launches == 3 and cal.free_before_weights_gb == pytest.approx(gate.calibration.free_before_weights_gb, abs=1e-6)
    gate2 = FeasibilityGate.for_space(space)
    gate2.calibration = cal
    assert gate2.check(flags).breakdown_gb["margin"] == pytest.approx(0.4, abs=0.02)  # one standard deviation


def _marginal_candidate(space: SearchSpace, gate: FeasibilityGate) -> tuple[dict, Any]:
    """The first kt-num-gpu-experts (chunk 1024) that fits only inside the safety margin."""
    for n in range(space.baseline["kt-num-gpu-experts"], 248, 4):
        flags = gate.resolve_auto(space.launch_flags({**space.baseline, "kt-num-gpu-experts": n,
                                                      "chunked-prefill-size": 1024}))
        rep = gate.check(flags)
        if not rep.feasible:
            return flags, rep
    raise AssertionError("nothing above the baseline is predicted not to fit")


def test_inside_the_margin_is_marginal_and_beyond_it_is_not(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    gate.calibration = dataclasses.replace(gate.calibration, anchor_difference_share=0.5)  # an unsure model: a wide margin
    flags, rep = _marginal_candidate(space, gate)
    assert rep.fits_without_margin and rep.slack_without_margin_gb is not None and rep.slack_without_margin_gb >= 0
    assert gate.allows(rep, 1) and not gate.allows(rep, 0)
    far = gate.check({**flags, "kt-num-gpu-experts": 240})
    assert not far.feasible and not far.fits_without_margin and far.slack_without_margin_gb < 0
    assert not gate.allows(far, 5)
    unanchored = FeasibilityGate.for_space(space).check(flags)  # nothing launched: no bare prediction
    assert unanchored.slack_without_margin_gb is None and not unanchored.fits_without_margin


def test_a_failed_launch_inside_the_margin_closes_it_there(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    gate.calibration = dataclasses.replace(gate.calibration, anchor_difference_share=0.5)
    flags, rep = _marginal_candidate(space, gate)
    log = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 0.04 GiB."
    gate.observe(log, flags, "oom_kv_alloc", predicted_fit=False, inside_margin=True)
    after = gate.check(flags)
    assert not after.feasible and not after.fits_without_margin and not gate.inside_margin(after)
    # chunk 1024 is the space's smallest: the activation test there is closed too
    assert rep.slack_with_lower_activations_gb is not None and rep.slack_with_lower_activations_gb >= rep.slack_without_margin_gb
    assert gate.calibration.anchor_extra_gb == pytest.approx(rep.slack_with_lower_activations_gb + 0.1, abs=1e-6)
    assert gate.check(gate.resolve_auto(space.launch_flags(space.baseline))).feasible  # the baseline still fits


def _activation_candidate(space: SearchSpace, gate: FeasibilityGate, chunk: int) -> tuple[dict, Any]:
    """The first kt-num-gpu-experts at `chunk` that fits only if activations are below their estimate."""
    for n in range(space.baseline["kt-num-gpu-experts"], 248):
        flags = gate.resolve_auto(space.launch_flags({**space.baseline, "kt-num-gpu-experts": n,
                                                      "chunked-prefill-size": chunk}))
        rep = gate.check(flags)
        if rep.fits_with_lower_activations:
            return flags, rep
    raise AssertionError(f"no activation test at chunk {chunk}")


def test_an_fits_with_lower_activations_is_launched_only_at_the_smallest_chunk(space: SearchSpace, tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    assert gate.test_chunk == 1024  # the smallest chunked-prefill-size the space offers
    for chunk in (1024, 4096):
        flags, rep = _activation_candidate(space, gate, chunk)
        assert not rep.feasible and not rep.fits_without_margin
        assert rep.slack_with_lower_activations_gb >= 0 > rep.slack_without_margin_gb  # fits only with activations below the estimate
        assert gate.inside_margin(rep) == (chunk == 1024)
        assert gate.allows(rep, 1) == (chunk == 1024) and not gate.allows(rep, 0)


def test_a_run_time_oom_of_an_fits_with_lower_activations_bounds_activations_from_below(space: SearchSpace,
                                                                             tmp_path: Path) -> None:
    gate = observed_gate(space, tmp_path)
    flags, rep = _activation_candidate(space, gate, 1024)
    log = (calibrate_log := launch(space, gate, {}, tmp_path)[1].log_text()) + \
        "\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 0.50 GiB."
    assert calibrate_log and _runtime_oom(log)
    extra = gate.calibration.anchor_extra_gb
    gate.observe(log, flags, "server_died", predicted_fit=False, inside_margin=True)
    assert gate.calibration.activation_lower_bytes_per_token is not None  # α is above what that run had left
    after = gate.check(flags)
    assert not gate.inside_margin(after) and gate.calibration.anchor_extra_gb == extra


def test_a_survived_fits_with_lower_activations_near_the_cliff_bounds_activations_from_above(tmp_path: Path) -> None:
    """On the 4xH100 space the activation estimate is about twice the simulator's: the optimum
    (N=108, chunk 2048) is only reachable by testing it, and a run there tightens α."""
    space = load_space(REPO / "search_spaces" / "sim-deepseek-v3-4xh100.yaml", check_paths=False)
    gate = observed_gate(space, tmp_path, {"kt-num-gpu-experts": 104, "kt-cpuinfer": 104,
                                           "chunked-prefill-size": 2048, "max-running-requests": 48})
    params = {"kt-num-gpu-experts": 108, "kt-cpuinfer": 104, "chunked-prefill-size": 2048, "max-running-requests": 48}
    flags, run = launch(space, gate, params, tmp_path)
    rep = gate.check(flags)
    assert rep.fits_with_lower_activations and gate.allows(rep, 1)
    assert run.outcome.reason is None  # the simulated server runs it
    before = gate.check(flags).breakdown_gb["activations"]
    gate.observe(run.log_text(), flags, None, predicted_fit=False, inside_margin=True)
    assert gate.check(flags).breakdown_gb["activations"] < 0.6 * before
    assert gate.check({**flags, "chunked-prefill-size": 8192}).breakdown_gb["activations"] < 0.6 * 4 * before


def test_kv_capacity_is_judged_with_less_free_memory_where_the_profile_sizes_the_pool(tmp_path: Path) -> None:
    """Where weights leave the KV profiler almost nothing, the pool's size swings with free
    memory: such a pool must hold the largest request even with the margin's memory gone."""
    space = load_space(REPO / "search_spaces" / "sim-deepseek-v3-4xh100.yaml", check_paths=False)
    gate = observed_gate(space, tmp_path, {"kt-num-gpu-experts": 104, "kt-cpuinfer": 104,
                                           "chunked-prefill-size": 2048, "max-running-requests": 48})
    flags = gate.resolve_auto(space.launch_flags({**space.baseline, "kt-num-gpu-experts": 112, "kt-cpuinfer": 104,
                                                  "chunked-prefill-size": 2048, "max-running-requests": 48}))
    rep = gate.check(flags)
    biggest = max(i + o for _, i, o in gate.workloads)
    assert 0 < rep.kv_capacity_tokens < 10 * biggest  # a pool capped far below max-total-tokens
    assert rep.constraints["kv_tokens_short"] > biggest - rep.kv_capacity_tokens  # judged smaller still
    assert not rep.feasible and not gate.inside_margin(rep)
