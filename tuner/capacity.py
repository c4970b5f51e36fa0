"""KV capacity against the workload's need, as the selection rule reads it from storage.

A launch's KV pool is what the server logged (``kv_tokens`` in ATTR_MEMORY); where the pool is
sized from free GPU memory, it differs between launches of the same flags, because free memory
at start-up does. The need (ATTR_KV_NEED, stored at launch from the space's workloads) is the
pool that keeps the workload's offered concurrency resident until it finishes. Launches whose
flags differ only in CPU-side knobs (`CPU_SIDE_FLAGS`) have the same memory footprint, so their
pools are draws of the same distribution and a memory failure of one is a failure of all.

Start-up free memory varies the same way, and a configuration that needs nearly all of it at run
time (prefill activations on top of what start-up took) runs out on some fresh starts however
often it started in the study. One launch is one draw of that free memory (:class:`StartDraws`
holds the study's); :func:`left_at_draw_gb` reads what a launch's flags would leave free after a
start at another draw, by how SGLang sizes the KV pool: a pool capped by max-total-tokens
(:func:`pool_capped`) leaves the whole difference free until the profile's surplus over the cap
is used up, a pool the profile sized takes all but (1 − mem-fraction-static) of it. Against that,
the selection rule reads a configuration's memory to spare on an average start and on a short
one; a launch that ran forwards at least as large (:func:`runs_at_least`) with less left after
start-up (:func:`available_after_start_gb`) shows that much is enough.

`capacities(study, objective)` gives, per configuration, the smallest pool its memory flags
were seen with, the spread of pools across launches, and how many of those launches failed for
memory; :class:`Capacity` judges a measured value at that smallest pool: a decode step's time
does not shrink when it carries more requests, so throughput at a fraction λ of the batch is at
least λ of the throughput (a lower bound, used only for rates).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.machine import GIB
from tuner.outcome import is_memory_reason
from tuner.storage import ATTR_FLAGS, ATTR_KV_NEED, ATTR_LAUNCHED, ATTR_MEMORY, ATTR_REASON

# Flags that size CPU thread pools only: they never change GPU memory or the KV pool.
CPU_SIDE_FLAGS = frozenset({"kt-cpuinfer", "kt-threadpool-count", "kt-max-deferred-experts-per-token"})
# Flags whose larger value never needs less GPU memory, the rest equal (weights, activations
# and staging, request slots and CUDA graphs, the KV pool).
MEMORY_MONOTONE_FLAGS = ("kt-num-gpu-experts", "chunked-prefill-size", "max-running-requests", "max-total-tokens")
# A pool closer to the need, or memory to spare closer to zero, than this many standard deviations
# of the launch-to-launch spread may fall short on a fresh start (about 2 % of starts for a normal
# spread).
THIN_Z = 2.0
# Servers log GiB; predicted spare and the memory model's figures are decimal GB.
_GB_PER_GIB = GIB / 1e9
# Flags that change what the servers find free before loading weights (one CUDA context per rank).
_TP_FLAGS = ("tensor-parallel-size", "tp-size")
# Flags whose larger value runs larger forwards (prefill chunks, decode batches), the rest equal,
# and flags that size start-up memory without changing a forward.
FORWARD_MONOTONE_FLAGS = ("chunked-prefill-size", "max-running-requests")
_NOT_FORWARD_FLAGS = frozenset({"kt-num-gpu-experts", "max-total-tokens", "mem-fraction-static", "cuda-graph-max-bs"})


def launched_flags(t: FrozenTrial) -> dict[str, Any]:
    """The flags the trial's server ran with (its params where they were not stored)."""
    return dict(t.user_attrs.get(ATTR_FLAGS) or t.params)


def pooled_sd(samples: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """The sd of values about their own sample's mean, pooled over samples, and its degrees
    of freedom (None with none: no sample had two values)."""
    ss, df = 0.0, 0
    for values in samples:
        if len(values) > 1:
            mean = sum(values) / len(values)
            ss += sum((x - mean) ** 2 for x in values)
            df += len(values) - 1
    return (math.sqrt(ss / df) if df else None), df


def memory_key(t: FrozenTrial) -> tuple[Any, ...]:
    """The launch's flags that can change its GPU memory (all but `CPU_SIDE_FLAGS`)."""
    flags = launched_flags(t)
    return tuple(sorted((k, repr(v)) for k, v in flags.items() if k not in CPU_SIDE_FLAGS))


def kv_pool(t: FrozenTrial) -> int | None:
    """The KV pool (tokens) the launch's server reported, None when it reported none."""
    mem = t.user_attrs.get(ATTR_MEMORY) or {}
    v = mem.get("kv_tokens", mem.get("max_total_num_tokens"))
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def kv_need(t: FrozenTrial, workload: str) -> int | None:
    """The KV tokens `workload` needs at once with this launch's flags (stored at launch)."""
    v = (t.user_attrs.get(ATTR_KV_NEED) or {}).get(workload)
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


@dataclass(frozen=True)
class Capacity:
    """One configuration's KV pool against its need."""

    need: int | None       # KV tokens the objective's workload needs at once; None: not stored
    pools: tuple[int | None, ...]  # the configuration's own measured launches, in its values' order
    worst: int | None      # the smallest pool any launch with the same memory flags had
    best: int | None       # the largest
    spread: float          # launch-to-launch sd of pools (tokens), pooled over memory flags seen twice
    launches: int          # launches with the same memory flags, any configuration, any fate
    memory_failures: int   # of them, failed for memory (start-up or run-time OOM, KV)

    @property
    def known(self) -> bool:
        return self.need is not None and self.worst is not None

    @property
    def margin(self) -> float | None:
        """(worst pool − need) / need; negative: some launch could not hold the need."""
        return None if not self.known else (self.worst - self.need) / self.need  # type: ignore[operator]

    @property
    def varies(self) -> bool:
        """Pools differ between launches of these memory flags, or do elsewhere in the study."""
        return self.known and (self.best != self.worst or self.spread > 0)

    @property
    def holds(self) -> bool:
        """Every launch's pool held the need, with THIN_Z spreads to spare (or nothing is known)."""
        return not self.known or self.worst >= self.need + THIN_Z * self.spread  # type: ignore[operator]

    @property
    def sensitive(self) -> bool:
        """The result may depend on the start-up draw: the pool varies and does not surely hold."""
        return self.varies and not self.holds

    def factor(self, i: int) -> float:
        """Lower bound on (value at the worst pool) / (value of own run i): the share of run i's
        batch the worst pool still holds; 1 when that batch fits the worst pool."""
        pool = self.pools[i] if i < len(self.pools) else None
        if not self.known or pool is None:
            return 1.0
        held = min(pool, self.need)  # type: ignore[type-var]
        return min(1.0, self.worst / held) if held > 0 else 1.0  # type: ignore[operator]


def capacities(study: optuna.Study, workload: str | None, groups: Mapping[tuple[Any, ...], Sequence[FrozenTrial]]
               ) -> dict[tuple[Any, ...], Capacity]:
    """Capacity of each configuration in `groups` (config key → its measured launches, in the
    order of its values), from every launch of the study."""
    launches = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get(ATTR_LAUNCHED) and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    by_key: dict[tuple[Any, ...], list[FrozenTrial]] = {}
    for t in launches:
        by_key.setdefault(memory_key(t), []).append(t)
    pools_by_key = {k: [p for p in map(kv_pool, ts) if p is not None] for k, ts in by_key.items()}
    spread = pooled_sd(pools_by_key.values())[0] or 0.0
    out = {}
    for cfg, ts in groups.items():
        key = memory_key(ts[0])
        pools = pools_by_key.get(key, [])
        same = by_key.get(key, [])
        out[cfg] = Capacity(
            need=kv_need(ts[0], workload) if workload else None, pools=tuple(kv_pool(t) for t in ts),
            worst=min(pools) if pools else None, best=max(pools) if pools else None, spread=spread,
            launches=len(same), memory_failures=sum(1 for t in same if is_memory_reason(t.user_attrs.get(ATTR_REASON))))
    return out


def needs_at_least(params: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """`params` needs at least the GPU memory of `than`: the same flags except CPU-side ones and
    `MEMORY_MONOTONE_FLAGS`, and none of those smaller."""
    keys = (set(params) | set(than)) - CPU_SIDE_FLAGS
    for k in keys:
        a, b = params.get(k), than.get(k)
        if k in MEMORY_MONOTONE_FLAGS and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if a < b:
                return False
        elif a != b:
            return False
    return True


def memory_failed_below(study: optuna.Study) -> list[dict[str, Any]]:
    """Flags of launches that failed for memory (a configuration needing at least as much fails too)."""
    return [launched_flags(t) for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(ATTR_LAUNCHED) and is_memory_reason(t.user_attrs.get(ATTR_REASON))]


def start_free_gib(t: FrozenTrial) -> float | None:
    """Free GPU memory (GiB, the worst rank) the launch's server found before loading weights:
    the logged figure, else what was left after the weights plus what they took."""
    mem = t.user_attrs.get(ATTR_MEMORY) or {}
    begin = mem.get("weight_begin_avail_gib")
    if isinstance(begin, (int, float)) and begin > 0:
        return float(begin)
    after, weights = mem.get("weight_avail_gib"), mem.get("weight_mem_gib")
    if isinstance(after, (int, float)) and isinstance(weights, (int, float)) and weights > 0:
        return float(after) + float(weights)
    return None


@dataclass(frozen=True)
class StartDraws:
    """Free GPU memory (decimal GB, the unit of predicted spare) the study's servers found
    before loading weights, per tensor parallelism (one CUDA context per rank): the start-up
    draw every launch gets."""

    by_tp: Mapping[tuple[str, ...], Sequence[float]]

    @property
    def sd(self) -> float | None:
        """Launch-to-launch sd, pooled over tensor parallelisms; None before two launches."""
        return pooled_sd(self.by_tp.values())[0]

    def mean(self, flags: Mapping[str, Any]) -> float | None:
        """The mean draw at these flags' tensor parallelism; None where none launched."""
        draws = self.by_tp.get(_tp_key(flags))
        return sum(draws) / len(draws) if draws else None


def _tp_key(flags: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(repr(flags.get(f)) for f in _TP_FLAGS)


def start_draws(study: optuna.Study) -> StartDraws:
    """Every launch's free memory before the weights (:func:`start_free_gib`), by TP."""
    by_tp: dict[tuple[str, ...], list[float]] = {}
    for t in study.get_trials(deepcopy=False):
        free = start_free_gib(t) if t.user_attrs.get(ATTR_LAUNCHED) else None
        if free is not None:
            by_tp.setdefault(_tp_key(launched_flags(t)), []).append(free * _GB_PER_GIB)
    return StartDraws(by_tp)


def pool_capped(t: FrozenTrial) -> bool:
    """The launch's KV pool is max-total-tokens (rounded down to whole pages), not the profile's
    share of free memory: SGLang gives the pool what the weights left less (1 −
    mem-fraction-static) of the free memory it found before them, or max-total-tokens where that
    is smaller (sglang-kt's ``profile_max_num_token``, upstream's ``_profile_available_bytes``
    and ``_apply_token_constraints``; tests/sim/test_dialect_conformance.py reads both)."""
    flags, pool = launched_flags(t), kv_pool(t)
    cap, page = flags.get("max-total-tokens"), flags.get("page-size") or 1
    if pool is None or not isinstance(cap, (int, float)) or cap <= 0 or not isinstance(page, int) or page < 1:
        return False
    return pool >= int(cap) // page * page


def _mem_fraction(flags: Mapping[str, Any]) -> float | None:
    mfs = flags.get("mem-fraction-static")
    return float(mfs) if isinstance(mfs, (int, float)) and not isinstance(mfs, bool) and 0 < mfs < 1 else None


def _cap_room_gb(t: FrozenTrial, mfs: float) -> float | None:
    """How much less free memory (GB) the launch's start-up could have found with its KV pool
    still at max-total-tokens: its profile's surplus over the pool, lost at mfs per GB of draw.
    The surplus counts the pool at the bytes it holds; a profiler that counts fewer per token
    (sglang-kt's MLA cell) has more room than this."""
    mem = t.user_attrs.get(ATTR_MEMORY) or {}
    after, pool, free = mem.get("weight_avail_gib"), mem.get("kv_size_gib"), start_free_gib(t)
    if not isinstance(after, (int, float)) or not isinstance(pool, (int, float)) or free is None:
        return None
    surplus = float(after) - free * (1.0 - mfs) - float(pool)
    return max(surplus, 0.0) * _GB_PER_GIB / mfs


def left_at_draw_gb(t: FrozenTrial, draw_gb: float) -> float | None:
    """What the launch's flags leave free after start-up (GB) on a start that finds `draw_gb`
    free before the weights, from what its own start left (:func:`available_after_start_gb`).
    Where max-total-tokens caps the KV pool, all of a difference in the draw stays free (a
    smaller draw: until it has used up the profile's surplus over the cap, :func:`_cap_room_gb`,
    then the pool shrinks); where the profile sizes the pool, (1 − mem-fraction-static) of it
    and the pool takes the rest. Where the flags do not give mem-fraction-static, a larger draw
    counts as no help to a profiled pool and a smaller one as a loss of all of it."""
    left, free = available_after_start_gb(t), start_free_gib(t)
    if left is None or free is None:
        return left
    diff = draw_gb - free * _GB_PER_GIB
    mfs = _mem_fraction(launched_flags(t))
    if pool_capped(t):
        if diff >= 0 or mfs is None or (room := _cap_room_gb(t, mfs)) is None:
            return left + diff
        return left - min(-diff, room) - (1.0 - mfs) * max(0.0, -diff - room)
    if mfs is None:
        return left + min(diff, 0.0)
    return left + (1.0 - mfs) * diff  # a larger draw may reach the cap, after which all of it stays free: not counted


def available_after_start_gb(t: FrozenTrial) -> float | None:
    """What the launch's server had free once started (the scheduler's ``available_gpu_mem``,
    worst rank; decimal GB): all that its forwards may take at run time."""
    v = (t.user_attrs.get(ATTR_MEMORY) or {}).get("available_gpu_mem_gib")
    return float(v) * _GB_PER_GIB if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def _forward_size(flags: Mapping[str, Any], flag: str) -> float:
    v = flags.get(flag)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return math.nan
    return math.inf if flag == "chunked-prefill-size" and v <= 0 else float(v)  # no chunking: whole prompts


def runs_at_least(params: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """`params` runs forwards at least as large as `than` (so needs at least its run-time
    memory beyond start-up): the same flags except CPU-side ones and `_NOT_FORWARD_FLAGS`,
    and none of `FORWARD_MONOTONE_FLAGS` smaller (no chunked-prefill-size: whole prompts)."""
    for k in (set(params) | set(than)) - CPU_SIDE_FLAGS - _NOT_FORWARD_FLAGS:
        if params.get(k) == than.get(k):
            continue
        # NaN (unset, or not a number) compares false: a difference there is not comparable
        if k not in FORWARD_MONOTONE_FLAGS or not _forward_size(params, k) >= _forward_size(than, k):
            return False
    return True
