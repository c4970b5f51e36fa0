"""Which configurations kttune launches, in what order: the search strategy and its sampler.

A real launch costs 10-20 minutes, so the budget is a handful of trials and the first ones
must already be good. The default strategy (`Strategy()`, measured in docs/tuning-quality.md):

1. **Warm start** (`warm_start`, enqueued once per study after the baseline): the KT
   deployment recipe for the knobs it covers, whatever the machine — kt-cpuinfer = physical
   cores − GPUs, kt-threadpool-count = NUMA nodes, max-running-requests ≥ the concurrency the
   workloads offer — the baseline's values (else the middle of the range) for the rest, and
   kt-num-gpu-experts filled in at ask time as the largest value the feasibility model says
   fits with the others (throughput rises with GPU experts until memory runs out).
2. **Local search around the incumbent** (`KttuneSampler`): one knob at a time, coarse steps
   first, then finer; when a move changes the memory left for experts, kt-num-gpu-experts
   follows its fitting boundary (a dependent bound), and the boundary's neighbours below are
   tried too (KV or runtime headroom can put the optimum just under it). Proposals that are
   already measured or predicted not to fit are skipped before they reach the loop.
3. **Global exploration** with multivariate TPE (constraint-aware: infeasible trials carry
   positive constraints) for a small share of proposals, for the first ones when there is
   nothing to start from, and whenever the neighbourhood is exhausted.

Nothing here is tuned to a scenario: the recipe is the deployment guide's rule, the step
ladder depends only on each param's grid, and every knob the strategy does not know is
searched the same way. `Strategy(inner="tpe"|"random", warm=..., snap=...)` gives the
variants the benchmark compares. (Optuna's GPSampler needs torch, which kttune does not
depend on, so it is not offered.)
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.config import CAPACITY_FLAGS, PREREQUISITES, SearchSpace
from tuner.errors import KttuneError
from tuner.feasibility import FeasibilityGate, launch_flags
from tuner.search.gp import denoised_best
from tuner.search.grid import _index, _ladder, _ordered, param_grid
from tuner.search.recipe import recipe
from tuner.selection import best_by_mean, config_key, direction_sign, measured, pareto_front
from tuner.storage import ATTR_LAUNCHED, boundary_failures

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


def make_sampler(space: SearchSpace, seed: int | None, strategy: Strategy = DEFAULT_STRATEGY, *,
                 gate: FeasibilityGate | None = None,
                 avoid: Callable[[Mapping[str, Any]], bool] | None = None) -> optuna.samplers.BaseSampler:
    """kttune's sampler for `space`; `gate` is the run's feasibility model (None: none);
    `avoid`: params the local search does not move to (measured clearly worse beforehand)."""
    if strategy.inner not in ("local", "tpe", "random"):
        raise KttuneError(f"strategy.inner must be local, tpe or random; got {strategy.inner!r}")
    return KttuneSampler(space, seed=seed, strategy=strategy, gate=gate, avoid=avoid)


class KttuneSampler(optuna.samplers.BaseSampler):
    """Warm-started local search with dependent capacity bounds over a global TPE (module doc)."""

    def __init__(self, space: SearchSpace, *, seed: int | None = None,
                 strategy: Strategy = DEFAULT_STRATEGY, gate: FeasibilityGate | None = None,
                 avoid: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        self._space, self._strategy, self._avoid = space, strategy, avoid
        self._rng = random.Random(seed)
        self._dists = space.distributions()
        self._grids = {p.flag: param_grid(p) for p in space.params}
        self._cap = next((p.flag for p in space.params if p.flag in CAPACITY_FLAGS
                          and _ordered(self._grids[p.flag])), None)
        self._global = self._make_global(strategy, seed)
        # The run's feasibility gate (shared with the loop, which teaches it); None: no model.
        self._gate = gate if strategy.snap or strategy.inner == "local" else None
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
    def _sync_gate(self, study: optuna.Study) -> FeasibilityGate | None:
        """The gate, with the boundary cache dropped whenever what it predicts may have
        changed: the loop taught it, or fewer launches inside the margin are left."""
        if self._gate is None:
            return None
        state = self._gate.state()
        left = self._space.feasibility.boundary_failures - boundary_failures(study.get_trials(deepcopy=False))
        if state != self._calibration_seen or left != self._failures_left:
            self._calibration_seen, self._failures_left = state, left
            self._boundary_cache.clear()
        return self._gate

    def _flags(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        if self._gate is None:
            return None
        return launch_flags(self._space, params, self._gate)

    def _fits(self, params: Mapping[str, Any]) -> bool:
        flags = self._flags(params)
        if flags is None or self._gate is None:
            return True
        try:
            return bool(self._gate.allows(self._gate.check(flags), self._failures_left))
        except KttuneError:
            return True

    def _spare_gb(self, params: Mapping[str, Any]) -> float:
        """Predicted GPU memory to spare (without the safety margin); 0 where unknown."""
        flags = self._flags(params)
        try:
            slack = self._gate.check(flags).slack_without_margin_gb if flags is not None and self._gate is not None else None
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
            if flags is None:
                return None
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
            params[self._cap] = self._holding(params, b) if b is not None else fallback
        return params

    def _holding(self, params: Mapping[str, Any], boundary: Any) -> Any:
        """The largest capacity-flag value up to `boundary` whose predicted KV pool holds what
        every workload runs at once (more GPU experts leave less room for KV, and a pool that
        holds a few of the offered requests costs more than the experts gain); `boundary` when
        no value's pool is predicted to hold it."""
        assert self._cap is not None
        for v in sorted((v for v in self._grids[self._cap] if v <= boundary), reverse=True):
            flags = self._flags({**params, self._cap: v})
            if flags is None or self._gate is None:
                return boundary
            try:
                report = self._gate.check(flags)
            except KttuneError:
                return boundary
            need = max(self._space.kv_need_tokens(flags).values(), default=0)
            if self._gate.allows(report, self._failures_left) and report.kv_capacity_tokens >= need:
                return v
        return boundary

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
        feasible = measured(trials)
        launched = sum(1 for t in trials if t.user_attrs.get(ATTR_LAUNCHED))
        explore = self._rng.random() < self._strategy.explore
        if not feasible or explore and launched >= self._strategy.startup_trials:
            return self._snap_global(study, self._global_relative(study, trial))
        inc = self._incumbent(study, feasible)
        tried = {config_key(t.params) for t in trials if t.params and t.number != trial.number}
        self._sync_gate(study)
        for cand in self._moves(study, dict(inc.params)):
            if config_key(cand) not in tried and not (self._avoid and self._avoid(cand)) and self._fits(cand):
                return cand
        return self._snap_global(study, self._global_relative(study, trial))

    def _incumbent(self, study: optuna.Study, feasible: list[FrozenTrial]) -> FrozenTrial:
        """Where the local search stands: the best mean over repeats (every feasible
        measurement counts, a configuration that failed elsewhere too: the search looks for
        good neighbourhoods, the deployment pick is `tuner.selection.pick`), or a random
        member of the Pareto front for several objectives."""
        dirs = study.directions
        if len(dirs) == 1:
            sign = direction_sign(dirs[0])
            if self._strategy.denoise:
                return denoised_best(self._grids, feasible, sign)
            return best_by_mean(feasible, sign)
        return self._rng.choice(pareto_front(feasible, dirs))

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
        head += [self._follow(study, cand, at_boundary) for cand in self._enabled_moves(inc)]
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
                out.extend(self._capacity_moves(inc, level))
            for f in flags:
                for value in self._steps(f, inc[f], ladders[f], level):
                    cand = self._follow(study, {**inc, f: value}, at_boundary)
                    room = self._strategy.room_first and cap is not None and at_boundary and cand[cap] > inc[cap]
                    (roomier if room else out).append(cand)
        # the most room first; at equal room, the most memory to spare (the likeliest to start)
        if cap is not None:
            key_flag: str = cap
            roomier.sort(key=lambda c: (-c[key_flag], -self._spare_gb(c)))
        return [c for c in head + roomier + out if not self._inert(c) or self._inert(inc)]

    def _dependents(self) -> list[tuple[str, str]]:
        return [(d, r) for d, r in PREREQUISITES.items() if d in self._grids and r in self._grids]

    def _inert(self, params: Mapping[str, Any]) -> bool:
        """A flag is set whose prerequisite is off: the same server as without it."""
        return any(params.get(d) and not params.get(r) for d, r in self._dependents())

    def _enabled_moves(self, inc: dict[str, Any]) -> list[dict[str, Any]]:
        """A flag whose prerequisite the incumbent has just turned on could not be measured
        before (it did nothing): try it first."""
        return [{**inc, d: v} for d, r in self._dependents() if inc.get(r) and not inc.get(d)
                for v in self._grids[d] if v]

    def _follow(self, study: optuna.Study, cand: dict[str, Any], at_boundary: bool) -> dict[str, Any]:
        """`cand` with the capacity flag on its fitting boundary when the incumbent sits on it."""
        if self._cap is not None and at_boundary:
            nb = self._boundary(study, cand)
            if nb is not None:
                cand[self._cap] = nb
        return cand

    def _capacity_moves(self, inc: dict[str, Any], level: int) -> list[dict[str, Any]]:
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

