"""The prescreen rule, what the search skips by it, the stored result, and `kttune cpubench` on
a simulated space (the simulator's CPU model standing in for the kernels)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuner.config import load_space
from tuner.cpubench import (
    Avoid,
    CpuBenchResult,
    Point,
    Shape,
    SweepPlan,
    apply_stored,
    bench_dir,
    doctor_row,
    load,
    parse_ints,
    plan_for_space,
    prescreen,
    save,
)
from tuner.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SIM = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml"
SHAPE = Shape("AMXINT4", 384, 8, 7168, 2048)


def _result(points: dict[tuple[int, int], dict[int, tuple[float, ...]]]) -> CpuBenchResult:
    batches = tuple(sorted(next(iter(points.values()))))
    plan = SweepPlan(SHAPE, tuple(sorted({t for t, _ in points})), tuple(sorted({p for _, p in points})), batches)
    return CpuBenchResult(plan, tuple(Point(t, p, s) for (t, p), s in points.items()), {"kt_kernel": "test"})


def test_a_point_slower_at_every_batch_beyond_the_noise_is_ruled_out() -> None:
    r = _result({(8, 1): {1: (1.00, 1.01, 0.99), 64: (2.0, 2.02, 1.98)},
                 (16, 1): {1: (0.50, 0.51, 0.49), 64: (1.0, 1.01, 0.99)}})
    s = prescreen(r)
    assert s.kept == ((16, 1),) and s.ruled_out == ((8, 1, 16, 1),)


def test_faster_at_one_batch_only_or_within_the_noise_keeps_both() -> None:
    mixed = _result({(8, 1): {1: (0.5, 0.5, 0.5), 64: (2.0, 2.0, 2.0)}, (16, 1): {1: (1.0, 1.0, 1.0), 64: (1.0, 1.0, 1.0)}})
    assert set(prescreen(mixed).kept) == {(8, 1), (16, 1)}
    noisy = _result({(8, 1): {1: (1.0, 1.3, 0.7)}, (16, 1): {1: (0.9, 1.2, 0.6)}})  # 10 % apart, 30 % noise
    assert set(prescreen(noisy).kept) == {(8, 1), (16, 1)}


def test_more_threads_than_the_free_cores_never_rule_out_fewer() -> None:
    r = _result({(56, 2): {1: (1.0, 1.0, 1.0)}, (64, 2): {1: (0.5, 0.5, 0.5)}})
    assert prescreen(r, free_cores=56).ruled_out == ()
    assert prescreen(r, free_cores=64).ruled_out == ((56, 2, 64, 2),)


def test_a_failed_point_is_kept_not_judged() -> None:
    r = _result({(8, 2): {1: (1.0, 1.0)}, (16, 2): {1: (0.5, 0.5)}})
    r = CpuBenchResult(r.plan, (*r.points, Point(4, 2, {}, error="exited -11")), r.env)
    assert (4, 2) in prescreen(r).kept


def test_avoid_tests_a_proposal_by_its_point_filling_fixed_flags() -> None:
    space = load_space(SIM, check_paths=False)
    avoid = Avoid(space, [(16, 1), (56, 1)])
    assert avoid({"kt-cpuinfer": 16, "kt-threadpool-count": 1}) and not avoid({"kt-cpuinfer": 16, "kt-threadpool-count": 2})
    import dataclasses
    fixed = dataclasses.replace(space, params=tuple(p for p in space.params if p.flag != "kt-threadpool-count"),
                                server=dataclasses.replace(space.server, args={**space.server.args, "kt-threadpool-count": 1}))
    assert Avoid(fixed, [(56, 1)])({"kt-cpuinfer": 56}) and not Avoid(space, [])


def test_kttune_run_launches_no_ruled_out_point_beyond_baseline_and_warm_start(tmp_path: Path) -> None:
    import optuna

    from tuner.loop import RunOptions, run_study
    from tuner.search import Strategy
    from tuner.sim.inprocess import InProcessRunner
    from tuner.storage import ATTR_LAUNCHED

    space = load_space(SIM, check_paths=False)
    ruled = Avoid(space, [(t, p) for t in range(16, 65, 4) for p in (1, 2) if p == 1 or t <= 48])
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="s", storage=storage, budget=8, seed=0, studies_dir=tmp_path, probe=False,
                      strategy=Strategy(explore=0.0), avoid=ruled)
    run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(noise_sigma=0.025, seed=0))
    launched = [t for t in optuna.load_study(study_name="s", storage=storage).trials if t.user_attrs.get(ATTR_LAUNCHED)]
    assert len(launched) == 8
    assert [t.number for t in launched[2:] if ruled(t.params)] == []


def test_plan_follows_the_space() -> None:
    plan = plan_for_space(load_space(SIM, check_paths=False))
    assert plan.shape == SHAPE
    assert plan.threads == tuple(range(16, 65, 4)) and plan.pools == (1, 2)
    assert plan.batches == (1, 2, 4, 8, 16, 32, 37, 1024) and plan.prefill == 1024


def test_stored_result_round_trips_and_doctor_tells_its_age(tmp_path: Path) -> None:
    r = _result({(8, 1): {1: (1.0, 1.1)}, (16, 1): {1: (0.5, 0.6)}})
    assert doctor_row(tmp_path, "s")[0] == "skip"
    save(r, bench_dir(tmp_path, "s"))
    back = load(bench_dir(tmp_path, "s"))
    assert back is not None and back.to_json() == r.to_json()
    status, detail, _fix = doctor_row(tmp_path, "s")
    assert status == "ok" and "just made" in detail


def test_parse_ints_names_the_field() -> None:
    assert parse_ints("--threads", "1-3,8") == (1, 2, 3, 8)
    with pytest.raises(ConfigError, match="--threads"):
        parse_ints("--threads", "a-b")


def test_cpubench_on_a_simulated_space_rules_out_points_for_the_next_run(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "tuner.cli", "cpubench", "--space", str(SIM), "--studies-dir", str(tmp_path),
                          "--threads", "16,32,48,56,64", "--repeats", "3"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (bench_dir(tmp_path, "sim-kimi-k2-thinking-8xl20") / "cpubench.png").is_file()
    avoid, notes = apply_stored(load_space(SIM, check_paths=False), tmp_path, "sim-kimi-k2-thinking-8xl20")
    # The scenario's two NUMA nodes: one pool reaches half the bandwidth, and oversubscribes its node.
    assert avoid is not None and {(t, 1) for t in (16, 32, 48, 56, 64)} <= avoid.points and notes


def test_run_dry_run_says_what_the_stored_sweep_rules_out(tmp_path: Path) -> None:
    r = _result({(t, p): {1: ((1.0 if p == 2 else 2.0),) * 3} for t in (16, 56) for p in (1, 2)})
    save(r, bench_dir(tmp_path, "sim-kimi-k2-thinking-8xl20"))
    res = subprocess.run([sys.executable, "-m", "tuner.cli", "run", "--space", str(SIM), "--studies-dir", str(tmp_path),
                          "--dry-run", "--budget", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ruled out (threads/pools) 16/1, 56/1" in res.stdout and "does not move to them" in res.stdout


def test_a_sweep_of_another_layer_is_not_used(tmp_path: Path) -> None:
    import dataclasses

    r = _result({(16, 1): {1: (2.0, 2.0)}, (16, 2): {1: (1.0, 1.0)}})
    other = dataclasses.replace(r, plan=dataclasses.replace(r.plan, shape=dataclasses.replace(SHAPE, experts=256)))
    save(other, bench_dir(tmp_path, "s"))
    avoid, notes = apply_stored(load_space(SIM, check_paths=False), tmp_path, "s")
    assert avoid is None and "not used" in notes[0]
