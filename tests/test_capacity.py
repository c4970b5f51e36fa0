"""The robust pick's memory evidence (`tuner.capacity` as `tuner.selection` reads it): KV pools
that vary across the need, start-up free memory that varies, and what a launch needing as much
shows about a configuration's memory to spare at run time."""
from __future__ import annotations

from typing import Any

import optuna
import pytest

from tuner.capacity import available_after_start_gb, runs_at_least, start_free_gib, start_free_sd
from tuner.config import ConfirmSpec
from tuner.machine import GIB
from tuner.selection import pick, repeat_groups
from tuner.storage.attrs import (
    ATTR_FLAGS,
    ATTR_KV_NEED,
    ATTR_LAUNCHED,
    ATTR_MEMORY,
    ATTR_REASON,
    ATTR_SPARE_GB,
    STUDY_ATTR_SPACE,
)

DIST = {"n": optuna.distributions.IntDistribution(0, 256), "chunk": optuna.distributions.IntDistribution(0, 8192)}
GB_PER_GIB = GIB / 1e9


def _study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(STUDY_ATTR_SPACE, {"objectives": ["decode.output_throughput"]})
    return study


def _launch(study: optuna.Study, n: int, value: float, *, chunk: int = 1024, free: float = 40.0,
            avail: float | None = None, spare: float | None = None, pool: int | None = None, need: int | None = None,
            reason: str | None = None) -> None:
    """One launched trial: `n` GPU experts at `chunk`; `free` GiB before the weights, `avail`
    GiB left once started; `pool` KV tokens against the decode workload's `need`."""
    params = {"n": n, "chunk": chunk}
    memory: dict[str, Any] = {"weight_begin_avail_gib": free}
    if avail is not None:
        memory["available_gpu_mem_gib"] = avail
    if pool is not None:
        memory["kv_tokens"] = pool
    attrs: dict[str, Any] = {ATTR_LAUNCHED: True, ATTR_FLAGS: {"kt-num-gpu-experts": n, "chunked-prefill-size": chunk},
                             ATTR_MEMORY: memory, ATTR_REASON: reason}
    if spare is not None:
        attrs[ATTR_SPARE_GB] = spare
    if need is not None:
        attrs[ATTR_KV_NEED] = {"decode": need}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=DIST, values=[0.0 if reason else value],
                                              user_attrs=attrs))


def test_runs_at_least_compares_forward_sizes_and_ignores_memory_only_flags() -> None:
    base = {"kt-num-gpu-experts": 100, "chunked-prefill-size": 1024, "max-running-requests": 37, "kt-cpuinfer": 60}
    assert runs_at_least({**base, "chunked-prefill-size": 2048}, base)
    assert runs_at_least({**base, "kt-num-gpu-experts": 10, "kt-cpuinfer": 8, "max-total-tokens": 9000}, base)
    assert not runs_at_least({**base, "max-running-requests": 36}, base)
    assert not runs_at_least({**base, "tensor-parallel-size": 4}, {**base, "tensor-parallel-size": 8})
    assert not runs_at_least(base, {**base, "chunked-prefill-size": -1})  # no chunking: whole prompts
    assert runs_at_least({**base, "chunked-prefill-size": -1}, base)
    assert not runs_at_least({k: v for k, v in base.items() if k != "chunked-prefill-size"}, base)


def test_start_free_reads_the_log_or_rebuilds_it_and_pools_its_spread_over_tp() -> None:
    study = _study()
    for free in (40.0, 41.0, 42.0):
        _launch(study, 1, 100.0, free=free)
    assert start_free_gib(study.trials[0]) == 40.0
    assert start_free_sd(study) == pytest.approx(1.0 * GB_PER_GIB)
    rebuilt = optuna.trial.create_trial(params={"n": 1}, distributions={"n": DIST["n"]}, values=[1.0], user_attrs={
        ATTR_LAUNCHED: True, ATTR_MEMORY: {"weight_avail_gib": 10.0, "weight_mem_gib": 30.5}})
    assert start_free_gib(rebuilt) == 40.5
    assert available_after_start_gb(rebuilt) is None
    assert start_free_sd(_study()) is None  # nothing launched: no spread


def test_a_pick_close_to_the_start_up_spread_gives_way_to_one_that_starts_every_time() -> None:
    study = _study()
    # Free memory before the weights varies by about 1 GiB between launches.
    for free in (39.0, 41.0, 40.0):
        _launch(study, 128, 100.0, free=free, spare=0.5)  # fastest, 0.5 GB to spare on an average start
    for free in (40.5, 39.5):
        _launch(study, 120, 96.0, free=free, spare=3.0)
    groups = {g.first.params["n"]: g for g in repeat_groups(study)}
    assert groups[128].thin_start and not groups[120].thin_start
    assert groups[128].free_sd == pytest.approx(0.79 * GB_PER_GIB, abs=0.01)
    assert pick(study, ConfirmSpec())[0].params["n"] == 120
    only = _study()
    for free in (39.0, 41.0):
        _launch(only, 128, 100.0, free=free, spare=0.5)
    assert pick(only, ConfirmSpec())[0].params["n"] == 128  # nothing starts more surely: still the pick


def test_a_launch_running_a_larger_chunk_with_less_left_shows_a_configuration_has_room() -> None:
    study = _study()
    for free in (39.0, 41.0, 40.0, 40.0):  # what start-up leaves follows the draw (a capped KV pool)
        _launch(study, 16, 50.0, chunk=4096, free=free, avail=free - 37.0, spare=1.0)  # a 4096 chunk ran in 2 GiB
    for free in (39.5, 40.5):
        _launch(study, 128, 100.0, free=free, avail=free - 34.0, spare=0.5)  # the model says 0.5 GB to spare
    fast = next(g for g in repeat_groups(study) if g.first.params["n"] == 128)
    assert fast.start_spare == pytest.approx(4.0 * GB_PER_GIB)  # 6 GiB left, a larger forward ran in 2
    assert not fast.thin_start
    assert pick(study, ConfirmSpec())[0].params["n"] == 128
    smaller_chunk = _study()
    for free in (39.0, 41.0, 40.0, 40.0):
        _launch(smaller_chunk, 16, 50.0, chunk=512, free=free, avail=free - 37.0, spare=1.0)  # a smaller forward shows nothing
    for free in (39.5, 40.5):
        _launch(smaller_chunk, 128, 100.0, free=free, avail=free - 34.0, spare=0.5)
    fast = next(g for g in repeat_groups(smaller_chunk) if g.first.params["n"] == 128)
    assert fast.start_spare == pytest.approx(0.5 * GB_PER_GIB) and fast.thin_start  # only its own spread of starts


def test_a_result_that_rests_on_a_lucky_kv_pool_is_judged_at_the_worst_pool_seen() -> None:
    study = _study()
    _launch(study, 128, 100.0, pool=20000, need=14000)
    _launch(study, 128, 70.0, pool=10000, need=14000)  # the same memory flags, an unlucky start-up
    _launch(study, 120, 90.0, pool=30000, need=14000)
    _launch(study, 120, 90.0, pool=30000, need=14000)
    groups = {g.first.params["n"]: g for g in repeat_groups(study)}
    lucky = groups[128]
    assert lucky.capacity is not None and lucky.capacity.sensitive and lucky.capacity.worst == 10000
    assert lucky.score < lucky.mean  # the lucky run counts at the pool it may well get
    assert pick(study, ConfirmSpec())[0].params["n"] == 120
    single = _study()
    _launch(single, 128, 100.0, pool=20000, need=14000)
    _launch(single, 124, 99.0, pool=19000, need=14000)
    _launch(single, 124, 99.0, pool=13000, need=14000)
    groups = {g.first.params["n"]: g for g in repeat_groups(single)}
    assert not groups[128].eligible  # pools vary across the need here: one launch says nothing of its draw
    assert pick(single, ConfirmSpec())[0].params["n"] == 124


def test_where_the_kv_pool_absorbs_the_start_up_draw_what_is_left_sets_the_spread() -> None:
    study = _study()
    for free, left in ((39.0, 1.80), (41.0, 1.82), (40.0, 1.81)):  # the pool took the draw: 1.8 GiB left each time
        _launch(study, 36, 100.0, free=free, avail=left, spare=0.9)
    for free, left in ((40.5, 3.01), (39.5, 3.0)):
        _launch(study, 32, 96.0, free=free, avail=left, spare=1.3)
    fast = next(g for g in repeat_groups(study) if g.first.params["n"] == 36)
    assert fast.free_sd is not None and fast.free_sd < 0.02 and not fast.thin_start
    assert pick(study, ConfirmSpec())[0].params["n"] == 36
