"""tuner.search.sampler."""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.config.space import CAPACITY_FLAGS, SearchSpace
from tuner.errors import KttuneError
from tuner.search.gp import denoised_best
from tuner.search.grid import _index, _key, _ladder, _ordered, param_grid
from tuner.search.recipe import _gate_for, recipe
from tuner.selection import _feasible
from tuner.storage.attrs import ATTR_LAUNCHED, STUDY_ATTR_CALIBRATION, boundary_failures

FINE_STEPS = (1, 2)      # capacity moves (grid points) tried before the coarse ones
SMALL_GRID = 6           # an ordered param with at most this many values has each tried as a move




@dataclass(frozen=True)
class Strategy:
    """inner: "local" (default), "tpe" or "random"; warm: enqueue the recipe; snap: set
    the capacity flag to its fitting boundary where the proposal leaves it free; explore:
    share of local-search proposals drawn from the global sampler instead; denoise: pick the
    local search's incumbent by a Gaussian-process posterior mean over the measured trials
    instead of the single best measurement (measured in docs/tuning-quality.md: a wash, so
    off by default); room_first / small_grid: see `_moves` / `_steps` (levers kept for the
    benchmark's ablations)."""

    inner: str = "local"
    warm: bool = True
    snap: bool = True
    explore: float = 0.1
    startup_trials: int = 3
    denoise: bool = False
    room_first: bool = True  # moves that make room for more of the capacity flag come first
    recipe_moves: bool = True  # moves that set one knob back to the deployment recipe's value come first
    small_grid: int = SMALL_GRID  # ordered params with at most this many values: every value is a move


DEFAULT_STRATEGY = Strategy()


def make_sampler(space: SearchSpace, seed: int | None,
                 strategy: Strategy = DEFAULT_STRATEGY) -> optuna.samplers.BaseSampler:
    if strategy.inner not in ("local", "tpe", "random"):
        raise KttuneError(f"strategy.inner must be local, tpe or random; got {strategy.inner!r}")
    return KttuneSampler(space, seed=seed, strategy=strategy)


class KttuneSampler(optuna.samplers.BaseSampler):
    """Warm-started local search with dependent capacity bounds over a global TPE (module doc)."""

    def __init__(self, space: SearchSpace, *, seed: int | None = None,
                 strategy: Strategy = DEFAULT_STRATEGY) -> None:
        self._space, self._strategy = space, strategy
        self._seed = seed
        self._rng = random.Random(seed)
        self._dists = space.distributions()
        self._grids = {p.flag: param_grid(p) for p in space.params}
        self._cap = next((p.flag for p in space.params if p.flag in CAPACITY_FLAGS
                          and _ordered(self._grids[p.flag])), None)
        self._global = self._make_global(strategy, seed)
        self._gate: Any | None = _gate_for(space) if strategy.snap or strategy.inner == "local" else None
        self._calibration_seen: Any = None
        self._boundary_cache: dict[tuple[Any, ...], Any] = {}
        self._failures_left = 0  # launches inside the safety margin that may still fail
        self._recipe: dict[str, Any] | None = None

    def _make_global(self, strategy: Strategy, seed: int | None) -> optuna.samplers.BaseSampler:
        if strategy.inner == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=strategy.startup_trials)

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    # -- BaseSampler -----------------------------------------------------------------------
    def reseed_rng(self) -> None:
        self._rng = random.Random()
        self._global.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._dists)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if set(search_space) != set(self._dists):
            return self._global_relative(study, trial)
        fixed = dict(trial.system_attrs.get("fixed_params") or {})
        if fixed:
            return self._complete(study, fixed)
        if self._strategy.inner != "local":
            params = self._global_relative(study, trial)
            return self._snap_global(study, params) if self._strategy.snap else params
        return self._local(study, trial)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._global.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._global.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._global.after_trial(study, trial, state, values)

    # -- feasibility model -----------------------------------------------------------------
    def _sync_gate(self, study: optuna.Study) -> Any | None:
        if self._gate is None:
            return None
        state = study.user_attrs.get(STUDY_ATTR_CALIBRATION)
        left = self._space.feasibility.boundary_failures - boundary_failures(study.get_trials(deepcopy=False))
        if state != self._calibration_seen or left != self._failures_left:
            self._gate.restore(state)
            self._calibration_seen, self._failures_left = state, left
            self._boundary_cache.clear()
        return self._gate

    def _flags(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        if self._gate is None:
            return None
        return self._gate.resolve_auto(self._space.launch_flags(params))

    def _fits(self, params: Mapping[str, Any]) -> bool:
        flags = self._flags(params)
        if flags is None:
            return True
        try:
            return bool(self._gate.allows(self._gate.check(flags), self._failures_left))  # type: ignore[union-attr]
        except KttuneError:
            return True

    def _spare_gb(self, params: Mapping[str, Any]) -> float:
        """Predicted GPU memory to spare (without the safety margin); 0 where unknown."""
        flags = self._flags(params)
        try:
            slack = self._gate.check(flags).slack_without_margin_gb if flags is not None else None  # type: ignore[union-attr]
        except KttuneError:
            slack = None
        return slack if slack is not None else 0.0

    def _boundary(self, study: optuna.Study, params: Mapping[str, Any]) -> Any | None:
        """Largest grid value of the capacity flag predicted to fit with the other params."""
        gate = self._sync_gate(study)
        if gate is None or self._cap is None:
            return None
        key = tuple(sorted((k, v) for k, v in params.items() if k != self._cap))
        if key in self._boundary_cache:
            return self._boundary_cache[key]
        from tuner.feasibility import max_gpu_experts, without_margin_calibration
        grid = self._grids[self._cap]
        found = None
        try:
            flags = self._flags({**params, self._cap: grid[-1]})
            cal = gate.calibration  # inside-the-margin launches allowed: scan from the bare boundary
            if self._failures_left > 0:
                cal = without_margin_calibration(cal)
            n = max_gpu_experts(gate.model, gate.hardware, flags, gate.workloads,
                                margin_gb=gate.margin_gb, calibration=cal)
            for v in sorted((v for v in grid if v <= n), reverse=True)[:8]:
                if self._fits({**params, self._cap: v}):
                    found = v
                    break
        except KttuneError:
            found = None
        self._boundary_cache[key] = found
        return found

    # -- proposals -------------------------------------------------------------------------
    def _complete(self, study: optuna.Study, fixed: dict[str, Any]) -> dict[str, Any]:
        """An enqueued trial (baseline, warm start): fill what it leaves free."""
        params = dict(fixed)
        for flag, grid in self._grids.items():
            if flag not in params and flag != self._cap:
                params[flag] = grid[len(grid) // 2]
        if self._cap is not None and self._cap not in params:
            b = self._boundary(study, params)
            grid = self._grids[self._cap]
            fallback = (self._space.baseline or {}).get(self._cap, grid[len(grid) // 2])
            params[self._cap] = b if b is not None else fallback
        return params

    def _global_relative(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        space = self._global.infer_relative_search_space(study, trial)
        return self._global.sample_relative(study, trial, space) if space else {}

    def _snap_global(self, study: optuna.Study, params: dict[str, Any]) -> dict[str, Any]:
        """Global proposals: half of them put the capacity flag on its boundary."""
        if self._cap is None or set(params) != set(self._dists) or self._rng.random() < 0.5:
            return params
        b = self._boundary(study, params)
        return {**params, self._cap: b} if b is not None else params

    def _local(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        measured = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(ATTR_LAUNCHED)
                    and t.values is not None and _feasible(t)]
        launched = sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED))
        explore = self._rng.random() < self._strategy.explore
        if not measured or explore and launched >= self._strategy.startup_trials:
            return self._snap_global(study, self._global_relative(study, trial))
        inc = self._incumbent(study, measured)
        tried = {_key(t.params) for t in trials if t.params and t.number != trial.number}
        self._sync_gate(study)
        for cand in self._moves(study, dict(inc.params)):
            if _key(cand) not in tried and self._fits(cand):
                return cand
        return self._snap_global(study, self._global_relative(study, trial))

    def _incumbent(self, study: optuna.Study, measured: list[FrozenTrial]) -> FrozenTrial:
        dirs = study.directions
        if len(dirs) == 1:
            sign = 1.0 if dirs[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
            if self._strategy.denoise:
                return denoised_best(self._grids, measured, sign)
            groups: dict[tuple[Any, ...], list[FrozenTrial]] = {}
            for t in measured:  # repeats of a configuration count by their mean
                groups.setdefault(_key(t.params), []).append(t)
            best = max(groups.values(), key=lambda ts: sign * float(np.mean([t.values[0] for t in ts])))
            return best[0]
        front = [t for t in measured if not any(_dominates(o, t, dirs) for o in measured)]
        return self._rng.choice(front)

    def _moves(self, study: optuna.Study, inc: dict[str, Any]) -> list[dict[str, Any]]:
        """Neighbours of the incumbent, most promising first: the capacity boundary, then one
        knob back to the deployment recipe's value (`recipe`), then moves that make room for
        more of the capacity flag (throughput rises with it), then
        one knob at a time on a ladder of step sizes (coarse to fine), the capacity flag
        following its boundary when the incumbent sits on it."""
        cap = self._cap
        at_boundary = False
        head: list[dict[str, Any]] = []
        if cap is not None:
            b = self._boundary(study, inc)
            at_boundary = b is not None and inc[cap] >= b
            if b is not None and inc[cap] != b:
                head.append({**inc, cap: b})
                grid = self._grids[cap]
                i, j = _index(grid, inc[cap]), _index(grid, b)
                if abs(j - i) > 2:   # a line search toward the boundary: halfway first
                    head.append({**inc, cap: grid[(i + j) // 2]})
        flags = [f for f in self._grids if f != cap]
        if self._strategy.recipe_moves:  # the deployment rule for a knob the search moved away from
            if self._recipe is None:
                self._recipe = recipe(self._space, self._gate)
            head += [self._follow(study, {**inc, f: v}, at_boundary)
                     for f, v in self._recipe.items() if f in inc and inc[f] != v]
        self._rng.shuffle(flags)
        ladders = {f: _ladder(len(self._grids[f])) for f in flags}
        depth = max((len(v) for v in ladders.values()), default=0)
        plan = len(self._capacity_plan(len(self._grids[cap]))) if cap is not None else 0
        roomier: list[dict[str, Any]] = []
        out: list[dict[str, Any]] = []
        for level in range(max(depth, plan)):
            if cap is not None:
                out.extend(self._capacity_moves(study, inc, level))
            for f in flags:
                for value in self._steps(f, inc[f], ladders[f], level):
                    cand = self._follow(study, {**inc, f: value}, at_boundary)
                    room = self._strategy.room_first and cap is not None and at_boundary and cand[cap] > inc[cap]
                    (roomier if room else out).append(cand)
        # the most room first; at equal room, the most memory to spare (the likeliest to start)
        roomier.sort(key=lambda c: (-c[cap], -self._spare_gb(c)))  # type: ignore[index]
        return head + roomier + out

    def _follow(self, study: optuna.Study, cand: dict[str, Any], at_boundary: bool) -> dict[str, Any]:
        """`cand` with the capacity flag on its fitting boundary when the incumbent sits on it."""
        if self._cap is not None and at_boundary:
            nb = self._boundary(study, cand)
            if nb is not None:
                cand[self._cap] = nb
        return cand

    def _capacity_moves(self, study: optuna.Study, inc: dict[str, Any], level: int) -> list[dict[str, Any]]:
        """Fine steps first (the optimum sits at or just under the fitting boundary, where KV
        or runtime headroom decides), then the ladder's coarse steps, both ways."""
        cap = self._cap
        assert cap is not None
        grid = self._grids[cap]
        plan = self._capacity_plan(len(grid))
        if level >= len(plan):
            return []
        i, step = _index(grid, inc[cap]), plan[level]
        return [{**inc, cap: grid[j]} for j in (i - step, i + step) if 0 <= j < len(grid)]

    @staticmethod
    def _capacity_plan(n: int) -> list[int]:
        coarse = [s for s in _ladder(n) if s > FINE_STEPS[-1]]
        return [*FINE_STEPS, *coarse, FINE_STEPS[-1] + 1]

    def _steps(self, flag: str, value: Any, ladder: list[int], level: int) -> list[Any]:
        grid = self._grids[flag]
        if not _ordered(grid) or len(grid) <= self._strategy.small_grid:  # a few values: each, nearest first
            i = _index(grid, value)
            return sorted((v for j, v in enumerate(grid) if j != i), key=lambda v: abs(_index(grid, v) - i)) \
                if level == 0 else []
        if level >= len(ladder):
            return []
        i = _index(grid, value)
        s = ladder[level]
        return [grid[j] for j in (i - s, i + s) if 0 <= j < len(grid)]


def _dominates(a: FrozenTrial, b: FrozenTrial, dirs: Sequence[optuna.study.StudyDirection]) -> bool:
    better = False
    for x, y, d in zip(a.values, b.values, dirs):
        sx, sy = (x, y) if d == optuna.study.StudyDirection.MAXIMIZE else (-x, -y)
        if sx < sy:
            return False
        better = better or sx > sy
    return better
