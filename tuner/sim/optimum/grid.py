"""A search space's grid on one simulator scenario: every value of each tuned param, the
SimConfig a point of the grid maps to, and the exhaustive search for the optimum.

Start-up memory is checked once per combination of the memory knobs; kt-cpuinfer,
kt-threadpool-count and deferral never change the footprint, so their CPU check is memoised
separately. A runtime OOM is monotone in the forward size, so it is decided from the
largest forward of a trace.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import numpy as np

from tuner.config import AUTO, ObjectiveSpec, ParamSpec, SearchSpace, SloSpec, split_env
from tuner.errors import ConfigError
from tuner.server import flag_args
from tuner.sim.args import SimArgs, UsageError, parse_args, to_sim_config
from tuner.sim.optimum.evaluator import PERF_FIELDS, Evaluation, SimEvaluator
from tuner.sim.optimum.traces import Trace, workload_metrics
from tuner.sim.perfmodel.config import SimConfig, resolve
from tuner.sim.perfmodel.startup import StartupResult, startup_check
from tuner.sim.scenario import Scenario, load_scenario

#: SimConfig fields that never change the start-up footprint (perfmodel.startup._footprint).
CPU_FIELDS = ("kt_cpuinfer", "kt_threadpool_count", "kt_max_deferred_experts_per_token")
FLOAT_GRID_POINTS = 33


def param_values(p: ParamSpec) -> list[Any]:
    """Every value of a param's grid (floats without a step: FLOAT_GRID_POINTS points)."""
    if p.choices is not None:
        return list(p.choices)
    assert p.low is not None and p.high is not None
    if not p.is_float:
        step = int(p.step or 1)
        return list(range(int(p.low), int(p.high) + 1, step))
    if p.step:
        steps = int(math.floor((p.high - p.low) / p.step + 1e-9))
        return [round(p.low + i * p.step, 12) for i in range(steps + 1)]
    if p.log:
        return [float(v) for v in np.geomspace(p.low, p.high, FLOAT_GRID_POINTS)]
    return [float(v) for v in np.linspace(p.low, p.high, FLOAT_GRID_POINTS)]


@dataclass(frozen=True)
class OptimumEntry:
    objective: str            # workload.metric
    direction: str
    value: float
    params: dict[str, Any]
    ties: int                 # grid configurations with the same value (rel 1e-9)
    near: dict[str, float]    # share of feasible configurations within 2 % / 5 % of it


@dataclass(frozen=True)
class OptimumResult:
    space: str
    scenario: str
    grid_size: int
    feasible: int
    entries: tuple[OptimumEntry, ...]
    seconds: float
    inert: tuple[str, ...] = ()     # tuned flags the simulator ignores


class _Score(NamedTuple):
    """Objective values shared by the memory-knob combinations of one group at one CPU-knob combination."""

    values: list[float]                    # per objective, in the space's order
    mem_combos: list[tuple[int, ...]]      # value indices of the memory knobs
    cpu_combo: tuple[int, ...]             # value indices of the CPU knobs
    configs: int                           # len(mem_combos): grid configurations it stands for


class SpaceGrid:
    """A search space on one simulator scenario: tuned params → SimConfig, single-config
    evaluation (memoised) and the exhaustive optimum."""

    def __init__(self, space: SearchSpace, scenario: str | Scenario | None = None, *,
                 expert_location: str | None = None) -> None:
        """`expert_location`: the recorded expert distribution `frequency` placement reads
        (without one it falls back to uniform, as the server does)."""
        self.space = space
        self.expert_location = expert_location
        self.values = {p.flag: param_values(p) for p in space.params}
        first = {p.flag: vals[0] for p, vals in zip(space.params, self.values.values())}
        base_flags = self._flags(first)
        # `max-total-tokens: auto` is sized per configuration, as kttune does before a launch
        self._auto = None
        if any(v == AUTO for v in base_flags.values()) or any(AUTO in v for v in self.values.values()):
            from tuner.feasibility import FeasibilityGate
            self._auto = FeasibilityGate.for_space(space)
        args = _parse(self._resolved(base_flags))
        name = scenario if scenario is not None else args.sim.scenario
        self.scn = name if isinstance(name, Scenario) else load_scenario(str(name))
        self.base = to_sim_config(args, split_env(base_flags)[1])
        self.deltas: dict[str, list[dict[str, Any]]] = {}
        for p in space.params:
            self.deltas[p.flag] = [_delta(self.base, _config(self._resolved(self._flags({**first, p.flag: v}))))
                                   for v in self.values[p.flag]]
        if self._auto is not None:   # max-total-tokens follows other knobs: not a delta of one param
            for ds in self.deltas.values():
                for d in ds:
                    d.pop("max_total_tokens", None)
        self._check_disjoint()
        shapes = {w.name: (w.num_prompts, w.input_len, w.output_len) for w in space.workloads}
        self.evaluator = SimEvaluator(self.scn, shapes)
        self._memo: dict[SimConfig, Evaluation] = {}
        self._scores: tuple[list[str], list[str], list[_Score]] | None = None

    def _flags(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.space.launch_flags(params, expert_location=self.expert_location)

    def _resolved(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        return self._auto.resolve_auto(flags) if self._auto is not None else dict(flags)

    def _finish(self, cfg: SimConfig, params: Mapping[str, Any]) -> SimConfig:
        """Fill `max-total-tokens: auto` for these params (a no-op without auto)."""
        if self._auto is None:
            return cfg
        flags = self._resolved(self._flags(params))
        return replace(cfg, max_total_tokens=_config(flags).max_total_tokens)

    def _check_disjoint(self) -> None:
        owner: dict[str, str] = {}
        for flag, ds in self.deltas.items():
            for f in {k for d in ds for k in d}:
                if f in owner and owner[f] != flag:
                    raise ConfigError(f"params {owner[f]} and {flag} both set the simulator's {f}; "
                                      "tune only one of them")
                owner[f] = flag

    @property
    def inert(self) -> tuple[str, ...]:
        return tuple(f for f, ds in self.deltas.items() if len(ds) > 1 and not any(ds))

    def sim_config(self, params: Mapping[str, Any]) -> SimConfig:
        merged: dict[str, Any] = {}
        for p in self.space.params:
            v = params[p.flag]
            vals = self.values[p.flag]
            if v in vals:
                merged.update(self.deltas[p.flag][vals.index(v)])
            else:  # off-grid value (e.g. an unstepped float): parse the whole configuration
                return _config(self._resolved(self._flags(params)))
        return self._finish(replace(self.base, **merged), params)

    def evaluate(self, params: Mapping[str, Any]) -> Evaluation:
        cfg = self.sim_config(params)
        ev = self._memo.get(cfg)
        if ev is None:
            ev = self._memo[cfg] = self.evaluator.evaluate(cfg)
        return ev

    def values_of(self, params: Mapping[str, Any]) -> list[float] | None:
        """The objective vector without noise, or None if the configuration fails or misses
        an SLO."""
        ev = self.evaluate(params)
        if not ev.feasible or any(s.violation(ev.metrics[s.key]) > 0 for s in self.space.slos):
            return None
        return [ev.metrics[o.key] for o in self.space.objectives]

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def optimum(self) -> OptimumResult:
        started = time.monotonic()
        evaluator = self.evaluator
        inert = set(self.inert)
        live = [p.flag for p in self.space.params if p.flag not in inert]
        cpu_flags = [f for f in live if all(set(d) <= set(CPU_FIELDS) for d in self.deltas[f])]
        mem_flags = [f for f in live if f not in cpu_flags]
        scored = sorted({objective.workload for objective in self.space.objectives}
                        | {slo.workload for slo in self.space.slos})
        # 1. start-up per combination of the memory knobs (CPU knobs at a neutral 1 thread, 1 pool)
        probe_cpu: dict[str, Any] = {"kt_cpuinfer": 1, "kt_threadpool_count": 1, "kt_max_deferred_experts_per_token": 0}
        items: list[tuple[tuple[int, ...], SimConfig, SimConfig, StartupResult]] = []
        for combo in itertools.product(*(range(len(self.values[f])) for f in mem_flags)):
            cfg_mem = replace(self.base, **self._merge(mem_flags, combo))
            if self._auto is not None:
                cfg_mem = self._finish(cfg_mem, self._params(mem_flags, combo, [], []))
            probe = replace(cfg_mem, **probe_cpu)
            st = startup_check(self.scn, probe)
            if st.ok and st.config is not None:
                items.append((combo, cfg_mem, probe, st))
        # 2. traces of the scored workloads (recorded on the probe: scheduling ignores the CPU
        # knobs); the other workloads only need to not fail
        for name in scored:
            evaluator.prepare([(p, s) for _, _, p, s in items], name)
        groups: dict[tuple[Any, ...], list[tuple[int, ...]]] = {}
        representatives: dict[tuple[Any, ...], tuple[SimConfig, StartupResult, dict[str, Trace]]] = {}
        for combo, cfg_mem, probe, st in items:
            rc = st.config
            assert rc is not None
            traces = {name: evaluator.trace(probe, st, name) for name in scored}
            if any(evaluator.runtime_failure(rc, st, t) for t in traces.values()):
                continue
            if any(evaluator.quick_failure(probe, st, workload) for workload in evaluator.workloads
                   if workload not in traces):
                continue
            top_batch = max((t.max_batch for t in traces.values()), default=1)
            key = (tuple(getattr(rc, f) for f in PERF_FIELDS if f not in ("cpuinfer", "threadpool", "deferral")),
                   tuple(id(traces[workload]) for workload in scored),
                   min(rc.graph_max_bs, st.max_running_requests, max(top_batch, 1)))
            groups.setdefault(key, []).append(combo)
            representatives.setdefault(key, (cfg_mem, st, traces))
        # 3. every CPU-knob combination on each group's representative
        wanted: dict[str, set[str]] = {}
        scored_items: tuple[ObjectiveSpec | SloSpec, ...] = (*self.space.objectives, *self.space.slos)
        for item in scored_items:
            wanted.setdefault(item.workload, set()).add(item.metric)
        cpu_combos = list(itertools.product(*(range(len(self.values[f])) for f in cpu_flags)))
        cpu_verdict: dict[tuple[Any, ...], bool] = {}
        scores: list[_Score] = []
        for key, combos in groups.items():
            cfg_mem, st, traces = representatives[key]
            for cpu_combo in cpu_combos:
                cfg = replace(cfg_mem, **self._merge(cpu_flags, cpu_combo))
                cpu_key = (cfg.kt_cpuinfer, cfg.kt_threadpool_count, cfg.kt_method, cfg.kt_weight_path is not None,
                      cfg.kt_num_gpu_experts is None, cfg.kt_gpu_experts_ratio is None)
                ok = cpu_verdict.get(cpu_key)
                if ok is None:
                    full = startup_check(self.scn, cfg)
                    ok = full.ok
                    if full.ok or full.stage == "cpu":   # the CPU check alone decided it
                        cpu_verdict[cpu_key] = ok
                if not ok:
                    continue
                rc = resolve(self.scn, cfg)
                metrics: dict[str, float] = {}
                for workload, names in wanted.items():
                    step_model = evaluator.model(rc, st, traces[workload])
                    metrics.update({f"{workload}.{metric}": value for metric, value in
                                    workload_metrics(step_model, traces[workload], names).items()})
                if any(slo.violation(metrics[slo.key]) > 0 for slo in self.space.slos):
                    continue
                objective_values = [metrics[objective.key] for objective in self.space.objectives]
                scores.append(_Score(objective_values, combos, cpu_combo, len(combos)))
        self._scores = (mem_flags, cpu_flags, scores)
        entries = []
        feasible = sum(score.configs for score in scores)
        for obj_index, objective in enumerate(self.space.objectives):
            if not scores:
                break
            sign = 1.0 if objective.direction == "maximize" else -1.0
            best = max(scores, key=lambda score: sign * score.values[obj_index])
            best_value = best.values[obj_index]
            ties = sum(score.configs for score in scores
                       if math.isclose(score.values[obj_index], best_value, rel_tol=1e-9))
            near = {f"{int(rel * 100)}%": sum(score.configs for score in scores
                                              if _within(score.values[obj_index], best_value, rel, sign)) / feasible
                    for rel in (0.02, 0.05)}
            params = self._params(mem_flags, best.mem_combos[0], cpu_flags, best.cpu_combo)
            entries.append(OptimumEntry(objective.key, objective.direction, best_value, params, ties, near))
        inert_combos = math.prod(len(self.values[f]) for f in inert) if inert else 1
        return OptimumResult(self.space.name, self.scn.name, self.grid_size(), feasible * inert_combos,
                             tuple(entries), time.monotonic() - started, tuple(sorted(inert)))

    def ranked(self, within: float = 0.05, objective: int = 0) -> list[tuple[float, dict[str, Any]]]:
        """Every feasible grid configuration within `within` (relative) of the optimum of one
        objective, best first (runs `optimum()` first if needed)."""
        if self._scores is None:
            self.optimum()
        assert self._scores is not None
        mem_flags, cpu_flags, scores = self._scores
        if not scores:
            return []
        sign = 1.0 if self.space.objectives[objective].direction == "maximize" else -1.0
        best = max(sign * score.values[objective] for score in scores)
        out: list[tuple[float, dict[str, Any]]] = []
        for values, combos, cpu_combo, _ in scores:
            value = values[objective]
            if _within(value, sign * best, within, sign):
                out.extend((value, self._params(mem_flags, mem_combo, cpu_flags, cpu_combo)) for mem_combo in combos)
        out.sort(key=lambda item: -sign * item[0])
        return out

    def _merge(self, flags: Sequence[str], combo: Sequence[int]) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for flag, index in zip(flags, combo):
            merged.update(self.deltas[flag][index])
        return merged

    def _params(self, mem_flags: Sequence[str], mem_combo: Sequence[int], cpu_flags: Sequence[str],
                cpu_combo: Sequence[int]) -> dict[str, Any]:
        index = dict(zip(mem_flags, mem_combo)) | dict(zip(cpu_flags, cpu_combo))
        return {p.flag: self.values[p.flag][index.get(p.flag, 0)] for p in self.space.params}


def _within(value: float, best: float, rel: float, sign: float) -> bool:
    return sign * (best - value) <= rel * abs(best)


def _config(flags: Mapping[str, Any]) -> SimConfig:
    """The model's configuration of launch flags (with tuned environment variables)."""
    return to_sim_config(_parse(flags), split_env(flags)[1])


def _parse(flags: Mapping[str, Any]) -> SimArgs:
    try:
        return parse_args(flag_args(split_env(flags)[0]) + ["--host", "127.0.0.1", "--port", "30000"])
    except UsageError as exc:
        raise ConfigError(f"the simulator rejects these launch flags: {exc}") from None


def _delta(base: SimConfig, cfg: SimConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(SimConfig) if getattr(cfg, f.name) != getattr(base, f.name)}
