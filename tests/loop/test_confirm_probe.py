"""Confirmation runs, early stop by a probe, and the dry run's strategy."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tests.search.test_sampler import sim_space
from tuner import outcome as objective
from tuner.config import ConfirmSpec, ProbeSpec, SearchSpace
from tuner.loop.preview import dry_run
from tuner.loop.run import RunOptions, run_study
from tuner.outcome import PRUNED, stop_cause
from tuner.report.text import best_table
from tuner.search.pruner import BelowBestPruner
from tuner.search.remeasure import leader_to_recheck
from tuner.selection import pick, pooled_noise, repeat_groups
from tuner.sim.inprocess import InProcessRunner
from tuner.storage.attrs import ATTR_CONFIRMATION_OF, ATTR_LAUNCHED, ATTR_REASON, ATTR_WARM_START
from tuner.testing.probe import ProbeEmulator
from tuner.trial.launch import TrialRun
from tuner.trial.probe import probe_workload


def _run(space: SearchSpace, tmp_path: Path, budget: int, runner: Any, **kw: Any) -> optuna.Study:
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="s", storage=storage, budget=budget, seed=0,  # type: ignore[arg-type]
                      studies_dir=tmp_path, **kw)
    run_study(space, opts, log=lambda _m: None, runner=runner)
    return optuna.load_study(study_name="s", storage=storage)


class LuckyFirst:
    """The simulator without noise, except that the first launch of the configuration with
    kt-num-gpu-experts == `lucky` reads 15 % high (one lucky run)."""

    def __init__(self, lucky: int) -> None:
        self.inner, self.lucky, self.seen = InProcessRunner(noise_sigma=0.0), lucky, 0

    def __call__(self, space: SearchSpace, flags: dict[str, Any], trial_dir: Path, **kw: Any) -> TrialRun:
        run = self.inner(space, flags, trial_dir, **kw)
        if flags.get("kt-num-gpu-experts") == self.lucky and run.outcome.ok and not self.seen:
            self.seen += 1
            m = {k: v * 1.15 if k.endswith("throughput") else v for k, v in run.outcome.metrics.items()}
            run.outcome = objective.success(space, m, {})
        return run


def test_confirmation_runs_remeasure_finalists_and_the_pick_uses_the_mean(tmp_path: Path) -> None:
    space = sim_space("qwen3-30b-a3b-1x4090")
    # The baseline (N=16, launched first) gets the lucky run: it leads until confirmed.
    space = replace(space, confirm=ConfirmSpec(recheck=False))  # end confirmations only
    study = _run(space, tmp_path, 10, LuckyFirst(lucky=space.baseline["kt-num-gpu-experts"]), probe=False)
    launched = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert len(launched) == 10
    confirms = [t for t in launched if t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None]
    assert len(confirms) == 2 and all(t.number >= launched[-2].number for t in confirms)
    for t in confirms:
        assert t.params == study.trials[t.user_attrs[ATTR_CONFIRMATION_OF]].params
    groups = repeat_groups(study)
    assert sum(len(g.values) == 2 for g in groups) >= 1
    best = pick(study, ConfirmSpec())[0]
    top = next(g for g in groups if g.first.number == best.number)  # the pick is a measured group (the
    # best score, or one with more GPU experts within the noise of it)
    assert top.first.params["kt-num-gpu-experts"] >= groups[0].first.params["kt-num-gpu-experts"]
    assert best.params["kt-num-gpu-experts"] != space.baseline["kt-num-gpu-experts"]  # lucky run beaten by the mean
    assert "mean" in best_table(space, study)[0][1] or len(top.values) == 1


def test_confirmation_defaults_and_overrides(tmp_path: Path) -> None:
    assert ConfirmSpec().runs_for(20) == 2 and ConfirmSpec().runs_for(9) == 0 and ConfirmSpec(runs=5).runs_for(3) == 2
    space = replace(sim_space("qwen3-30b-a3b-1x4090"), confirm=ConfirmSpec(runs=0))
    study = _run(space, tmp_path, 10, InProcessRunner(noise_sigma=0.0), probe=False)
    assert not any(t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None for t in study.trials)
    study = _run(space, tmp_path, 6, InProcessRunner(noise_sigma=0.0), probe=False, confirm=3)
    assert sum(t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None for t in study.trials) == 3


def test_probe_prunes_far_below_best_and_keeps_the_launch_count(tmp_path: Path) -> None:
    space = replace(sim_space("qwen3-30b-a3b-1x4090"), confirm=ConfirmSpec(runs=0),
                    probe=ProbeSpec(fraction=0.25, prune_below=0.9, min_trials=1))
    assert probe_workload(space) is not None and probe_workload(space).output_len < space.workload("decode").output_len
    runner = ProbeEmulator(InProcessRunner(noise_sigma=0.0), sigma=0.0)
    study = _run(space, tmp_path, 12, runner)
    launched = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert len(launched) == 12
    pruned = [t for t in launched if t.state == TrialState.PRUNED]
    assert pruned and runner.pruned == len(pruned) and runner.saved_s > 0
    best_value = max(t.values[0] for t in launched if t.state == TrialState.COMPLETE and t.user_attrs.get("reason") is None)
    for t in pruned:
        assert t.user_attrs["reason"] == PRUNED and t.intermediate_values[0] < 0.9 * best_value + 1e-9
        assert t.intermediate_values[0] < t.user_attrs["probe_threshold"]  # what `kttune show` prints beside it
    from rich.console import Console

    from tuner.report import render_trial

    console = Console(record=True, width=300)
    render_trial(study, pruned[0], [], console)
    assert (f"probe {pruned[0].intermediate_values[0]:.4g} against the pruner's threshold "
            f"{pruned[0].user_attrs['probe_threshold']:.4g}") in console.export_text()
    # Every fully measured trial reported its probe too (the pruner's reference).
    assert all(0 in t.intermediate_values for t in launched if t.state == TrialState.COMPLETE and t.user_attrs.get("reason") is None)


def test_below_best_pruner_directions() -> None:
    for direction, good, bad in (("maximize", 100.0, 70.0), ("minimize", 10.0, 14.0)):
        study = optuna.create_study(direction=direction, pruner=BelowBestPruner(0.8, min_trials=1))
        t0 = study.ask()
        t0.report(good, 0)
        assert not t0.should_prune()  # nothing to compare with yet
        study.tell(t0, good)
        t1 = study.ask()
        t1.report(bad, 0)
        assert t1.should_prune()
        t2 = study.ask()
        t2.report(good * (0.95 if direction == "maximize" else 1.05), 0)
        assert not t2.should_prune()


def test_pruned_runs_do_not_stop_the_study() -> None:
    assert stop_cause([PRUNED] * 5) is None


def test_dry_run_proposes_baseline_then_warm_start(tmp_path: Path) -> None:
    space = sim_space("qwen3-30b-a3b-1x4090")
    lines: list[str] = []
    argvs = dry_run(space, budget=3, seed=0, log=lines.append)
    assert len(argvs) == 3
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="s", storage=storage, budget=3, seed=0, studies_dir=tmp_path,  # type: ignore[arg-type]
                      probe=False)
    run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(noise_sigma=0.0))
    study = optuna.load_study(study_name="s", storage=storage)
    real = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert real[1].user_attrs.get(ATTR_WARM_START)
    for argv, t in zip(argvs[:2], real[:2]):  # the enqueued trials are exactly what a run launches
        for flag, value in t.params.items():
            assert argv[argv.index(f"--{flag}") + 1] == str(value)
    assert any("warm start" in line for line in lines)


def test_next_confirmation_counts_other_workers_queued_confirmations() -> None:
    from tuner.search.remeasure import next_confirmation

    study = optuna.create_study(direction="maximize")
    for x, v in ((1, 10.0), (2, 9.0), (3, 5.0)):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={"x": optuna.distributions.IntDistribution(0, 9)},
                                                  value=v, user_attrs={ATTR_LAUNCHED: True}))
    assert next_confirmation(study, 2).params == {"x": 1}
    study.enqueue_trial({"x": 1}, user_attrs={ATTR_CONFIRMATION_OF: 0})  # another worker's, not run yet
    assert next_confirmation(study, 2).params == {"x": 2}
    assert next_confirmation(study, 1).params == {"x": 1}


def _measured(study: optuna.Study, n: int, value: float | None, *, reason: str | None = None) -> None:
    dist = {"n": optuna.distributions.IntDistribution(0, 100)}
    attrs: dict[str, Any] = {ATTR_LAUNCHED: True}
    if reason:
        attrs[ATTR_REASON] = reason
    study.add_trial(optuna.trial.create_trial(params={"n": n}, distributions=dist, values=[0.0 if reason else value],
                                              state=TrialState.COMPLETE, user_attrs=attrs))


def test_a_narrow_leader_is_rechecked_once_and_a_clear_one_is_not() -> None:
    study = optuna.create_study(direction="maximize")
    _measured(study, 1, 100.0)
    _measured(study, 2, 101.0)  # leads by 1 %: inside a 3 % noise
    assert leader_to_recheck(study, 0.03).params == {"n": 2}
    assert leader_to_recheck(study, 0.003) is None  # a quiet machine: 1 % is a real lead
    _measured(study, 2, 99.5)  # the leader, measured twice, still leads the runner-up by < 1 %:
    assert leader_to_recheck(study, 0.03).params == {"n": 1}  # the runner-up may have had an unlucky run
    _measured(study, 1, 98.0)
    assert leader_to_recheck(study, 0.03) is None  # both measured twice: settled
    _measured(study, 3, 130.0)  # leads by 30 %
    assert leader_to_recheck(study, 0.03) is None


def test_pooled_noise_moves_from_the_prior_to_the_repeats() -> None:
    study = optuna.create_study(direction="maximize")
    for v in (100.0, 100.0, 100.0, 100.0):
        _measured(study, 1, v)
    for v in (50.0, 50.0, 50.0, 50.0):
        _measured(study, 2, v)
    quiet = pooled_noise(repeat_groups(study), 0.03)
    assert 0 < quiet < 0.03 * 0.8  # six identical repeats pull the prior down
    assert abs(pooled_noise(repeat_groups(study)[:0], 0.03) - 0.03) < 1e-12


def test_a_configuration_that_failed_a_relaunch_is_never_the_pick() -> None:
    study = optuna.create_study(direction="maximize")
    _measured(study, 1, 100.0)
    _measured(study, 2, 120.0)
    _measured(study, 2, None, reason="oom")  # its confirmation ran out of memory
    assert [g.first.params["n"] for g in repeat_groups(study)] == [1]
    assert pick(study, ConfirmSpec())[0].params == {"n": 1}


def test_run_study_rechecks_a_narrow_leader_before_the_final_confirmations(tmp_path: Path) -> None:
    space = sim_space("qwen3-30b-a3b-1x4090")
    study = _run(space, tmp_path, 12, InProcessRunner(noise_sigma=0.025, seed=3), probe=False)
    launched = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert len(launched) == 12
    early = [t for t in launched[:-2] if t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None]
    assert early, "no leader was re-measured during the search"
    for t in early:
        assert t.params == study.trials[t.user_attrs[ATTR_CONFIRMATION_OF]].params
    off = _run(replace(space, confirm=ConfirmSpec(recheck=False)), tmp_path / "off", 12,
               InProcessRunner(noise_sigma=0.025, seed=3), probe=False)
    off_launched = [t for t in off.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert not [t for t in off_launched[:-2] if t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None]


def test_the_pick_among_tied_configurations_is_the_one_with_memory_to_spare() -> None:
    from tuner.selection import pick_group
    from tuner.storage.attrs import ATTR_SPARE_GB

    study = optuna.create_study(direction="maximize")
    dist = {"n": optuna.distributions.IntDistribution(0, 100)}

    def add(n: int, value: float, spare: float) -> None:
        study.add_trial(optuna.trial.create_trial(params={"n": n}, distributions=dist, values=[value],
                                                  user_attrs={ATTR_LAUNCHED: True, ATTR_SPARE_GB: spare}))
    for v in (100.5, 99.9):
        add(1, v, 0.1)  # the best mean, 0.1 GB from the memory limit
    for v in (100.0, 100.2):
        add(2, v, 3.0)  # tied with it, 3 GB to spare
    add(3, 99.8, 9.0)  # tied too, but measured once: not enough to trade for
    assert pick_group(repeat_groups(study), 0.03).first.params == {"n": 2}
    assert pick(study, ConfirmSpec())[0].params == {"n": 2}
    for v in (90.0, 90.5):
        add(4, v, 20.0)  # 10 % slower: not tied, however much it spares
    assert pick_group(repeat_groups(study), 0.03).first.params == {"n": 2}


def test_launches_inside_the_margin_are_marked_bounded_and_can_be_turned_off(tmp_path: Path) -> None:
    from tuner.config import FeasibilitySpec
    from tuner.storage.attrs import ATTR_MARGINAL, ATTR_RUNTIME_NEED_GB, ATTR_SPARE_GB, boundary_failures

    space = sim_space("kimi-k2-thinking-8xl20")
    study = _run(space, tmp_path / "on", 10, InProcessRunner(noise_sigma=0.025, seed=0), probe=False)
    launched = [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]
    inside = [t for t in launched if t.user_attrs.get(ATTR_MARGINAL)]
    assert inside, "no launch went inside the safety margin toward the memory boundary"
    assert max(t.params["kt-num-gpu-experts"] for t in inside) > space.baseline["kt-num-gpu-experts"]
    assert boundary_failures(study.trials) <= space.feasibility.boundary_failures
    assert all(t.user_attrs.get(ATTR_SPARE_GB) is not None for t in launched[1:])  # anchored after the baseline
    assert all(t.user_attrs.get(ATTR_RUNTIME_NEED_GB, -1) >= 0 for t in launched[1:])
    off = _run(replace(space, feasibility=FeasibilitySpec(boundary_failures=0)), tmp_path / "off", 10,
               InProcessRunner(noise_sigma=0.025, seed=0), probe=False)
    assert not [t for t in off.trials if t.user_attrs.get(ATTR_MARGINAL)]


def test_a_pick_found_inside_the_margin_is_said_so() -> None:
    from tuner.report.text import boundary_notes
    from tuner.storage.attrs import ATTR_MARGINAL, ATTR_SPARE_GB

    study = optuna.create_study(direction="maximize")
    dist = {"n": optuna.distributions.IntDistribution(0, 300)}
    for n, value, marginal in ((200, 45.0, False), (208, 47.5, True), (208, 47.1, False)):
        study.add_trial(optuna.trial.create_trial(params={"n": n}, distributions=dist, values=[value], user_attrs={
            ATTR_LAUNCHED: True, ATTR_MARGINAL: marginal, ATTR_SPARE_GB: 0.2 if n == 208 else 1.5}))
    notes = boundary_notes(study, ConfirmSpec())
    assert len(notes) == 1 and "trial 1" in notes[0] and "0.20 GB" in notes[0] and "2 of 2" in notes[0]
    study.add_trial(optuna.trial.create_trial(params={"n": 200}, distributions=dist, values=[60.0],
                                              user_attrs={ATTR_LAUNCHED: True, ATTR_SPARE_GB: 1.5}))
    assert boundary_notes(study, ConfirmSpec()) == []  # the pick is no longer one launched inside the margin


def test_a_pick_found_by_an_fits_with_lower_activations_says_the_estimate_was_beaten() -> None:
    from tuner.report.text import boundary_notes
    from tuner.storage.attrs import ATTR_MARGINAL, ATTR_SPARE_GB

    study = optuna.create_study(direction="maximize")
    dist = {"n": optuna.distributions.IntDistribution(0, 300)}
    for value in (52.0, 51.8):  # predicted short at the activation estimate, and it ran twice
        study.add_trial(optuna.trial.create_trial(params={"n": 108}, distributions=dist, values=[value], user_attrs={
            ATTR_LAUNCHED: True, ATTR_MARGINAL: True, ATTR_SPARE_GB: -0.45}))
    notes = boundary_notes(study, ConfirmSpec())
    assert len(notes) == 1 and "0.45 GB short at the activation estimate" in notes[0] and "2 of 2" in notes[0]
