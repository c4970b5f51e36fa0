"""tuner.search: the warm start, the local search with dependent capacity bounds, and the
study loop driving it (through `run_study` with the in-process simulated server)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from tests.conftest import REPO
from tuner.config import ParamSpec, SearchSpace, load_space, parse_space
from tuner.errors import KttuneError
from tuner.feasibility import FeasibilityGate
from tuner.loop.run import RunOptions, run_study
from tuner.search.gp import denoised_best, gp_posterior_mean
from tuner.search.grid import param_grid, snap
from tuner.search.recipe import recipe
from tuner.search.sampler import DEFAULT_STRATEGY, KttuneSampler, Strategy, make_sampler
from tuner.selection import direction_sign, measured
from tuner.sim.inprocess import InProcessRunner
from tuner.sim.optimum.grid import SpaceGrid
from tuner.storage.attrs import ATTR_DUPLICATE_OF, ATTR_LAUNCHED, ATTR_REASON, ATTR_WARM_START

SPACES = REPO / "search_spaces"


def sim_space(name: str) -> SearchSpace:
    return load_space(SPACES / f"sim-{name}.yaml", check_paths=False)


def study_of(space: SearchSpace, tmp_path: Path, budget: int, *, seed: int = 0, noise: float = 0.0,
             feasibility: bool = True, strategy: Strategy = DEFAULT_STRATEGY) -> optuna.Study:
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="s", storage=storage, budget=budget, seed=seed,
                      studies_dir=tmp_path, check_feasibility=feasibility, strategy=strategy)
    run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(noise_sigma=noise, seed=seed))
    return optuna.load_study(study_name="s", storage=storage)


def launched(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.user_attrs.get(ATTR_LAUNCHED)]


def test_param_grid_and_snap() -> None:
    assert param_grid(ParamSpec("a", low=0, high=12, step=4)) == [0, 4, 8, 12]
    assert param_grid(ParamSpec("a", choices=(1, 2))) == [1, 2]
    logs = param_grid(ParamSpec("a", low=1, high=4096, log=True))
    assert logs[0] == 1 and logs[-1] == 4096 and len(logs) <= 33 and logs == sorted(set(logs))
    floats = param_grid(ParamSpec("a", low=0.5, high=0.9, is_float=True))
    assert floats[0] == 0.5 and floats[-1] == 0.9 and len(floats) == 33
    big = param_grid(ParamSpec("a", low=0, high=10**6))
    assert len(big) <= 4097 and big[0] == 0 and big[-1] == 10**6
    assert snap([16, 20, 24], 23) == 20 and snap([16, 20, 24], 23, down=False) == 24
    assert snap([16, 20], 8) == 16 and snap([16, 20], 99, down=False) == 20


@pytest.mark.parametrize("name, want", [
    ("kimi-k2-thinking-8xl20", {"kt-cpuinfer": 56, "kt-threadpool-count": 2, "max-running-requests": 37}),
    ("deepseek-v3-8x4090-48g", {"kt-cpuinfer": 88, "kt-threadpool-count": 2, "max-running-requests": 37}),
    ("qwen3-30b-a3b-1x4090", {"kt-cpuinfer": 22, "kt-threadpool-count": 1, "max-running-requests": 37}),
])
def test_recipe_follows_the_machine_not_the_baseline(name: str, want: dict[str, int]) -> None:
    space = sim_space(name)
    got = recipe(space, FeasibilityGate.for_space(space))
    assert {k: got[k] for k in want} == want
    assert "kt-num-gpu-experts" not in got           # filled at ask time from the boundary
    assert got["chunked-prefill-size"] == space.baseline["chunked-prefill-size"]  # type: ignore[index]


def test_recipe_on_other_hardware_reads_the_overrides() -> None:
    data = yaml.safe_load((SPACES / "sim-kimi-k2-thinking-8xl20.yaml").read_text())
    data["hardware"]["cpu"] = {"sockets": 4, "cores_per_socket": 12, "threads_per_core": 2, "numa_nodes": 4, "amx": True}
    data["params"]["kt-threadpool-count"] = {"choices": [1, 2, 4]}
    space = parse_space(data, check_paths=False)
    got = recipe(space, FeasibilityGate.for_space(space))
    assert got["kt-cpuinfer"] == 40 and got["kt-threadpool-count"] == 4   # 48 cores - 8 GPUs, 4 nodes


def test_study_warm_starts_where_the_kv_pool_holds_the_workload_and_finds_the_optimum(tmp_path: Path) -> None:
    space = sim_space("qwen3-30b-a3b-1x4090")
    study = study_of(space, tmp_path, 6)
    runs = launched(study)
    assert len(runs) == 6 and runs[0].user_attrs.get("baseline")
    warm = runs[1]
    assert warm.user_attrs.get(ATTR_WARM_START)
    gate = FeasibilityGate.for_space(space)

    def predicted(n: int) -> tuple[bool, bool]:
        """(fits, its predicted KV pool holds every workload's need) at n GPU experts."""
        flags = gate.resolve_auto(space.launch_flags({**warm.params, "kt-num-gpu-experts": n}))
        report = gate.check(flags)
        return report.feasible, report.kv_capacity_tokens >= max(space.kv_need_tokens(flags).values())

    n = warm.params["kt-num-gpu-experts"]
    assert predicted(n) == (True, True)
    assert predicted(n + 4) != (True, True)       # the largest such N: one more step fits no more, or holds less
    assert predicted(n + 4)[0]                    # here it still fits, but its pool is short of the 37 requests
    keys = [tuple(sorted(t.params.items())) for t in runs]
    assert len(set(keys)) == len(keys)                               # nothing measured twice
    assert all(t.user_attrs.get(ATTR_REASON) is None for t in runs)  # nothing launched that fails
    grid = SpaceGrid(space)
    best_value, best = max((grid.values_of(t.params)[0], t.params) for t in runs)  # type: ignore[index]
    for p in space.params:        # the best launch is a local optimum of the grid (noise is off)
        values = grid.values[p.flag]
        i = values.index(best[p.flag])
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                assert (grid.values_of({**best, p.flag: values[j]}) or [0.0])[0] <= best_value * (1 + 1e-9)


def test_default_beats_plain_tpe_at_ten_launches(tmp_path: Path) -> None:
    space = sim_space("deepseek-v3-8x4090-48g")
    grid = SpaceGrid(space)

    def found(study: optuna.Study) -> float:
        return max(v[0] for t in launched(study) if (v := grid.values_of(t.params)))

    default = found(study_of(space, tmp_path / "a", 10, seed=1, noise=0.025))
    tpe = found(study_of(space, tmp_path / "b", 10, seed=1, noise=0.025,
                         strategy=Strategy(inner="tpe", warm=False, snap=False)))
    baseline = grid.values_of(dict(space.baseline or {}))[0]  # type: ignore[index]
    assert default > tpe and default > 1.15 * baseline


def test_a_space_of_other_flags_is_searched_too(tmp_path: Path) -> None:
    """No KT knob, no baseline: the sampler still proposes valid, distinct configurations."""
    data = yaml.safe_load((SPACES / "sim-qwen3-30b-a3b-1x4090.yaml").read_text())
    data["server"]["args"].update({"kt-num-gpu-experts": 16, "kt-cpuinfer": 22, "kt-threadpool-count": 1,
                                   "max-running-requests": 37})
    data["params"] = {"schedule-conservativeness": {"low": 0.5, "high": 1.5}, "stream-interval": {"low": 1, "high": 8},
                      "schedule-policy": {"choices": ["fcfs", "lpm"]}}
    del data["baseline"]
    space = parse_space(data, check_paths=False)
    study = study_of(space, tmp_path, 8)
    runs = launched(study)
    assert len(runs) == 8 and len({tuple(sorted(t.params.items())) for t in runs}) == 8
    for t in runs:
        assert 0.5 <= t.params["schedule-conservativeness"] <= 1.5 and t.params["schedule-policy"] in ("fcfs", "lpm")


def test_without_a_model_the_sampler_degrades_to_search_only(tmp_path: Path) -> None:
    data = yaml.safe_load((SPACES / "sim-qwen3-30b-a3b-1x4090.yaml").read_text())
    data["server"]["args"]["model-path"] = str(tmp_path / "no-model")
    space = parse_space(data, check_paths=False)
    sampler = make_sampler(space, 0)
    assert isinstance(sampler, KttuneSampler) and sampler._gate is None  # noqa: SLF001
    study = study_of(space, tmp_path, 4, feasibility=False)
    runs = launched(study)
    assert len(runs) == 4 and len({tuple(sorted(t.params.items())) for t in runs}) == 4
    # the machine-free part of the recipe: here the baseline itself, so not launched twice
    warm = next(t for t in study.trials if t.user_attrs.get(ATTR_WARM_START))
    assert warm.params == {**space.baseline, "max-running-requests": 37}  # type: ignore[dict-item]
    assert not warm.user_attrs.get(ATTR_LAUNCHED) and warm.user_attrs.get(ATTR_DUPLICATE_OF) == 0


def test_duplicates_are_not_relaunched(tmp_path: Path) -> None:
    data = yaml.safe_load((SPACES / "sim-qwen3-30b-a3b-1x4090.yaml").read_text())
    data["server"]["args"].update({"kt-threadpool-count": 1, "max-running-requests": 37})
    data["params"] = {"kt-num-gpu-experts": {"choices": [12, 16]}, "kt-cpuinfer": {"choices": [20, 22]}}
    data["baseline"] = {"kt-num-gpu-experts": 16, "kt-cpuinfer": 22}
    space = parse_space(data, check_paths=False)
    storage = optuna.storages.InMemoryStorage()
    opts = RunOptions(study_name="s", storage=storage, budget=4, seed=0, studies_dir=tmp_path)  # type: ignore[arg-type]
    summary = run_study(space, opts, log=lambda _m: None, runner=InProcessRunner(noise_sigma=0))
    study = optuna.load_study(study_name="s", storage=storage)
    assert summary.launched == 4
    assert len({tuple(sorted(t.params.items())) for t in launched(study)}) == 4
    assert not any(t.user_attrs.get(ATTR_DUPLICATE_OF) is not None for t in launched(study))


def test_gp_posterior_mean_finds_the_peak_through_noise() -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 15)[:, None]
    truth = 1 - 2 * (x[:, 0] - 0.5) ** 2
    raw_err, gp_err = [], []
    for _ in range(30):
        y = truth + rng.normal(0, 0.05, len(truth))
        raw_err.append(abs(x[int(np.argmax(y)), 0] - 0.5))
        gp_err.append(abs(x[int(np.argmax(gp_posterior_mean(x, y))), 0] - 0.5))
    assert np.mean(gp_err) < 0.7 * np.mean(raw_err)
    assert np.allclose(gp_posterior_mean(x, np.ones(15)), 1.0)


def test_denoised_best_uses_the_direction(tmp_path: Path) -> None:
    space = sim_space("qwen3-30b-a3b-1x4090")
    study = optuna.create_study(direction="minimize")
    for v in (3.0, 1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(params={"kt-num-gpu-experts": int(v) * 4},
                                                  distributions={"kt-num-gpu-experts": space.distributions()["kt-num-gpu-experts"]},
                                                  values=[v], user_attrs={ATTR_LAUNCHED: True}))
    grids = {p.flag: param_grid(p) for p in space.params}
    assert denoised_best(grids, measured(study.trials), direction_sign(study.direction)).values == [1.0]


def test_unknown_inner_sampler_is_refused() -> None:
    with pytest.raises(KttuneError, match="strategy.inner"):
        make_sampler(sim_space("qwen3-30b-a3b-1x4090"), 0, Strategy(inner="bogus"))


def test_a_lever_is_tried_once_its_prerequisite_is_on_and_never_while_inert() -> None:
    from tuner.search.sampler import KttuneSampler

    space = sim_space("kimi-k2-thinking-8xl20-placement")
    sampler = KttuneSampler(space, seed=0)
    inc = dict(space.baseline or {})
    thr, dyn = "kt-gpu-prefill-token-threshold", "kt-enable-dynamic-expert-update"
    assert sampler._enabled_moves(inc) == []                     # threshold 0: dynamic update does nothing
    assert sampler._inert({**inc, dyn: True}) and not sampler._inert({**inc, thr: 1024, dyn: True})
    on = {**inc, thr: 1024}
    assert sampler._enabled_moves(on) == [{**on, dyn: True}]
    study = optuna.create_study(direction="maximize")
    moves = sampler._moves(study, dict(inc))
    assert moves and not any(sampler._inert(m) for m in moves)
