"""Which configurations kttune launches, in what order (issue 6).

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

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import KttuneError
from tuner.space import ParamSpec, SearchSpace
from tuner.study import ATTR_LAUNCHED, ATTR_REASON, ATTR_SPARE_GB, STUDY_ATTR_CALIBRATION, boundary_failures

#: Flags whose throughput rises until GPU memory runs out: searched from their fitting boundary.
CAPACITY_FLAGS = ("kt-num-gpu-experts",)
ATTR_WARM_START = "warm_start"
STUDY_ATTR_WARM_STARTED = "kttune:warm_started"
GRID_CAP = 4097          # a param with more grid points is moved on a thinned grid
FLOAT_POINTS = 33        # grid of an unstepped float / log range
FINE_STEPS = (1, 2)      # capacity moves (grid points) tried before the coarse ones
SMALL_GRID = 6           # an ordered param with at most this many values has each tried as a move

Log = Callable[[str], None]


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


# ----------------------------------------------------------------------------- grids


def param_grid(p: ParamSpec) -> list[Any]:
    """The values a param is moved over: its own grid, thinned when very large."""
    if p.choices is not None:
        return list(p.choices)
    assert p.low is not None and p.high is not None
    lo, hi = p.low, p.high
    if p.is_float:
        if p.step:
            k = int(math.floor((hi - lo) / p.step + 1e-9))
            if k + 1 <= GRID_CAP:
                return [round(lo + i * p.step, 12) for i in range(k + 1)]
        pts = np.geomspace(lo, hi, FLOAT_POINTS) if p.log else np.linspace(lo, hi, FLOAT_POINTS)
        if p.step:
            pts = lo + np.round((pts - lo) / p.step) * p.step
        return sorted({float(round(v, 12)) for v in pts})
    step = int(p.step or 1)
    count = int((hi - lo) // step) + 1
    if p.log:
        pts = np.geomspace(lo, hi, min(count, FLOAT_POINTS))
    elif count <= GRID_CAP:
        return list(range(int(lo), int(hi) + 1, step))
    else:
        pts = np.linspace(lo, hi, GRID_CAP)
    return sorted({int(lo + round((v - lo) / step) * step) for v in pts})


def _ordered(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def snap(values: Sequence[Any], target: float, *, down: bool = True) -> Any:
    """The grid value nearest `target` from below (down) or above; the end if none is."""
    nums = sorted(values)
    if down:
        below = [v for v in nums if v <= target + 1e-9]
        return below[-1] if below else nums[0]
    above = [v for v in nums if v >= target - 1e-9]
    return above[0] if above else nums[-1]


# ----------------------------------------------------------------------------- recipe


def recipe(space: SearchSpace, gate: Any | None) -> dict[str, Any]:
    """The warm-start values of every non-capacity param (see the module doc)."""
    base = dict(space.baseline or {})
    out: dict[str, Any] = {}
    hw = gate.hardware if gate is not None else None
    flags = space.launch_flags(base)
    tp = _int(flags.get("tensor-parallel-size", flags.get("tp-size", 1))) or 1
    offered = max((w.max_concurrency or w.num_prompts) for w in space.workloads)
    for p in space.params:
        grid = param_grid(p)
        if p.flag in CAPACITY_FLAGS:
            continue
        numeric = _ordered(grid)
        if p.flag == "kt-cpuinfer" and hw is not None and numeric:
            out[p.flag] = snap(grid, max(hw.cpu.physical_cores - tp, 1))
        elif p.flag == "kt-threadpool-count" and hw is not None and numeric:
            inter = getattr(gate.model, "moe_intermediate_size", 0) or 0
            ok = [v for v in grid if v <= hw.cpu.numa_nodes and (not inter or inter % int(v) == 0)]
            out[p.flag] = max(ok) if ok else snap(grid, hw.cpu.numa_nodes)
        elif p.flag == "max-running-requests" and numeric:
            out[p.flag] = snap(grid, offered, down=False)
        elif p.flag in base:
            out[p.flag] = base[p.flag]
        else:
            out[p.flag] = grid[len(grid) // 2]
    return out


def warm_start(study: optuna.Study, space: SearchSpace, log: Log = print) -> bool:
    """Enqueue the recipe once per study (after the baseline), unless the study's sampler is
    a strategy without warm start. The capacity flag is left out so the sampler sets it at
    ask time from the then-current memory calibration."""
    strategy = getattr(study.sampler, "strategy", None)
    if strategy is None or not strategy.warm or study.user_attrs.get(STUDY_ATTR_WARM_STARTED):
        return False
    study.set_user_attr(STUDY_ATTR_WARM_STARTED, True)
    params = recipe(space, _gate_for(space))
    study.enqueue_trial(params, user_attrs={ATTR_WARM_START: True}, skip_if_exists=True)
    log("warm start enqueued: " + " ".join(f"{k}={v}" for k, v in params.items()))
    return True


def _gate_for(space: SearchSpace) -> Any | None:
    """The feasibility model, or None where model or hardware cannot be resolved."""
    from tuner.feasibility_gate import FeasibilityGate
    try:
        return FeasibilityGate.for_space(space)
    except KttuneError:
        return None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- sampler


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
            slack = self._gate.check(flags).bare_slack_gb if flags is not None else None  # type: ignore[union-attr]
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
        from tuner.feasibility import boundary_calibration, max_gpu_experts
        grid = self._grids[self._cap]
        found = None
        try:
            flags = self._flags({**params, self._cap: grid[-1]})
            cal = gate.calibration  # inside-the-margin launches allowed: scan from the bare boundary
            if self._failures_left > 0:
                cal = boundary_calibration(cal)
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


def recommend(study: optuna.Study, space: SearchSpace) -> FrozenTrial | None:
    """The measured trial the strategy believes best: with one objective and three or more
    measurements, the highest Gaussian-process posterior mean (robust to a lucky run);
    otherwise the best measurement. None before any feasible measurement."""
    measured = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
                and t.user_attrs.get(ATTR_LAUNCHED) and t.values is not None and _feasible(t)]
    if not measured:
        return None
    if len(study.directions) > 1:
        return measured[0] if len(measured) == 1 else max(measured, key=lambda t: t.values[0])
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return denoised_best({p.flag: param_grid(p) for p in space.params}, measured, sign)


def denoised_best(grids: Mapping[str, Sequence[Any]], measured: Sequence[FrozenTrial], sign: float) -> FrozenTrial:
    if len(measured) < 3:
        return max(measured, key=lambda t: sign * t.values[0])
    x = np.asarray([encode(grids, t.params) for t in measured])
    y = np.asarray([_signed_log(t.values[0], sign) for t in measured])
    return measured[int(np.argmax(gp_posterior_mean(x, y)))]


def encode(grids: Mapping[str, Sequence[Any]], params: Mapping[str, Any]) -> list[float]:
    """Grid coordinates in [0, 1] (one-hot for unordered choices)."""
    out: list[float] = []
    for flag, grid in grids.items():
        v = params.get(flag)
        if _ordered(grid):
            out.append(_index(grid, v) / max(len(grid) - 1, 1) if v is not None else 0.5)
        else:
            out.extend(1.0 if v == g else 0.0 for g in grid)
    return out


def _signed_log(v: float, sign: float) -> float:
    """Throughputs and latencies vary by factors: compare them on a log scale (sign-aware)."""
    return sign * math.log(v) if v > 0 else sign * v


def gp_posterior_mean(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior mean at the training points of a GP with an RBF kernel and white noise, the
    length scale and noise level chosen by marginal likelihood on a small grid."""
    sd = float(y.std())
    if sd <= 0 or len(y) < 2:
        return y
    z = (y - y.mean()) / sd
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    best: tuple[float, np.ndarray] | None = None
    for ell in (0.05, 0.1, 0.2, 0.4, 0.8):
        k = np.exp(-d2 / (2 * ell * ell))
        for noise in (0.003, 0.01, 0.03, 0.1, 0.3):
            try:
                chol = np.linalg.cholesky(k + noise * np.eye(len(z)))
            except np.linalg.LinAlgError:
                continue
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
            lml = -0.5 * float(z @ alpha) - float(np.log(np.diag(chol)).sum())
            if best is None or lml > best[0]:
                best = (lml, k @ alpha)
    return y if best is None else best[1] * sd + y.mean()


def _ladder(n: int) -> list[int]:
    """Step sizes in grid points, coarse to fine: ~n/8, halving down to 1."""
    s = max(1, round(n / 8))
    out = []
    while s > 1:
        out.append(s)
        s //= 2
    return out + [1]


def _index(grid: Sequence[Any], value: Any) -> int:
    if value in grid:
        return list(grid).index(value)
    return min(range(len(grid)), key=lambda j: abs(grid[j] - value))


def _key(params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(params.items()))


def _feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values()) and not t.user_attrs.get(ATTR_REASON)


def _dominates(a: FrozenTrial, b: FrozenTrial, dirs: Sequence[optuna.study.StudyDirection]) -> bool:
    better = False
    for x, y, d in zip(a.values, b.values, dirs):
        sx, sy = (x, y) if d == optuna.study.StudyDirection.MAXIMIZE else (-x, -y)
        if sx < sy:
            return False
        better = better or sx > sy
    return better


# ----------------------------------------------------------------------------- noise


ATTR_CONFIRMATION_OF = "confirmation_of"


@dataclass(frozen=True)
class Repeats:
    """All launched measurements of one configuration: the first trial and its repeats."""

    first: FrozenTrial
    values: tuple[float, ...]
    spare_gb: float | None = None  # least GPU memory to spare predicted for its launches

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def spread(self) -> float:
        """Half the range of the repeats (0 for a single run)."""
        return (max(self.values) - min(self.values)) / 2 if len(self.values) > 1 else 0.0


def repeat_groups(study: optuna.Study) -> list[Repeats]:
    """Feasible launched measurements grouped by configuration, best mean first (single
    objective; the empty list for several). A configuration that failed any of its launches
    (an OOM on a re-launch, a crash) is left out: a profile must start every time."""
    if len(study.directions) != 1:
        return []
    groups: dict[tuple[Any, ...], list[FrozenTrial]] = {}
    failed: set[tuple[Any, ...]] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE or not t.user_attrs.get(ATTR_LAUNCHED):
            continue
        if t.user_attrs.get(ATTR_REASON):
            failed.add(_key(t.params))
        elif t.values is not None and _feasible(t):
            groups.setdefault(_key(t.params), []).append(t)
    for key in failed:
        groups.pop(key, None)
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    out = [Repeats(min(ts, key=lambda t: t.number), tuple(t.values[0] for t in ts), _least_spare(ts))
           for ts in groups.values()]
    return sorted(out, key=lambda r: (-sign * r.mean, r.first.number))


def _least_spare(trials: Sequence[FrozenTrial]) -> float | None:
    spares = [float(t.user_attrs[ATTR_SPARE_GB]) for t in trials if t.user_attrs.get(ATTR_SPARE_GB) is not None]
    return min(spares) if spares else None


def _less_capacity(params: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Fewer GPU experts (a capacity flag) than `than`: not a tie however close the runs, since
    throughput rises with them; what trades at equal capacity is memory (R, chunk, ...)."""
    return any(isinstance(params.get(f), (int, float)) and isinstance(than.get(f), (int, float))
               and params[f] < than[f] for f in CAPACITY_FLAGS)


def pick_group(groups: Sequence[Repeats], prior_noise: float, z: float = 0.5) -> Repeats | None:
    """The configuration to deploy: the best mean, except that among those statistically tied
    with it (within `z` standard errors of the difference, noise from :func:`pooled_noise`;
    both measured at least twice; no fewer GPU experts) the one with the most GPU memory to
    spare wins: the same throughput as far as the runs can tell, and the likeliest to start
    every time. `groups` as from :func:`repeat_groups`."""
    if not groups:
        return None
    top = groups[0]
    if top.spare_gb is None or top.mean <= 0 or len(top.values) < 2:
        return top
    sigma = pooled_noise(groups, prior_noise)
    tied = [g for g in groups if g.spare_gb is not None and g.mean > 0 and len(g.values) > 1 and
            abs(math.log(top.mean) - math.log(g.mean)) < z * sigma * math.sqrt(1.0 / len(top.values) + 1.0 / len(g.values))
            and not _less_capacity(g.first.params, top.first.params)]
    return max(tied, key=lambda g: g.spare_gb) if tied else top  # type: ignore[arg-type,return-value]


def pooled_noise(groups: Sequence[Repeats], prior: float, prior_weight: float = 4.0) -> float:
    """Run-to-run spread (sd of log values) pooled over configurations measured more than
    once, shrunk toward `prior` (worth `prior_weight` degrees of freedom) while repeats are few."""
    ss, df = prior_weight * prior * prior, prior_weight
    for g in groups:
        logs = [math.log(v) for v in g.values if v > 0]
        if len(logs) > 1:
            mean = sum(logs) / len(logs)
            ss += sum((x - mean) ** 2 for x in logs)
            df += len(logs) - 1
    return math.sqrt(ss / df)


def leader_to_recheck(study: optuna.Study, prior_noise: float, z: float = 1.0) -> FrozenTrial | None:
    """Of the two best configurations, the one measured once, when the leader leads by less
    than `z` standard errors of the difference (noise from :func:`pooled_noise`): the local
    search would otherwise build on one lucky run, or drop the better configuration for one
    unlucky run. The leader first when both were measured once. Single objective only."""
    groups = repeat_groups(study)
    if len(groups) < 2 or min(groups[0].mean, groups[1].mean) <= 0:
        return None
    top, runner = groups[0], groups[1]
    once = [g for g in (top, runner) if len(g.values) == 1]
    if not once:
        return None
    sigma = pooled_noise(groups, prior_noise)
    lead = abs(math.log(top.mean) - math.log(runner.mean))
    se = sigma * math.sqrt(1.0 / len(top.values) + 1.0 / len(runner.values))
    return once[0].first if lead < z * se else None


def next_confirmation(study: optuna.Study, finalists: int) -> FrozenTrial | None:
    """The finalist (top `finalists` by mean) with the fewest measurements, counting
    confirmations other workers have queued or are running; ties go to the better mean."""
    groups = repeat_groups(study)[:finalists]
    if not groups:
        return None
    pending: dict[int, int] = {}
    for t in study.get_trials(deepcopy=False):
        of = t.user_attrs.get(ATTR_CONFIRMATION_OF)
        if of is not None and not t.state.is_finished():
            pending[of] = pending.get(of, 0) + 1
    return min(groups, key=lambda g: len(g.values) + pending.get(g.first.number, 0)).first


class BelowBestPruner(optuna.pruners.BasePruner):
    """Prune a trial whose probe (its step-0 intermediate value) is below `ratio` × the best
    probe of the other trials (above best / ratio when minimizing), once `min_trials` others
    reported one. Relative to the best, not a percentile: with a budget of 20 most launches
    are near the incumbent, where a percentile would prune good configurations."""

    def __init__(self, ratio: float, min_trials: int = 2) -> None:
        self._ratio, self._min = ratio, min_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        mine = trial.intermediate_values.get(0)
        if mine is None or len(study.directions) != 1:
            return False
        others = [t.intermediate_values[0] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and 0 in t.intermediate_values
                  and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if len(others) < self._min:
            return False
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return mine < self._ratio * max(others)
        return mine > min(others) / self._ratio
