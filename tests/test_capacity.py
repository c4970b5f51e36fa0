"""The robust pick's memory evidence (`tuner.capacity` as `tuner.selection` reads it): KV pools
that vary across the need, start-up free memory that varies, and what a launch needing as much
shows about a configuration's memory to spare at run time."""
from __future__ import annotations

from typing import Any

import optuna
import pytest

from tuner.capacity import THIN_Z, available_after_start_gb, pool_capped, runs_at_least, start_draws, start_free_gib
from tuner.config import ConfirmSpec
from tuner.machine import GIB
from tuner.selection import pick, repeat_groups
from tuner.storage.attrs import (
    ATTR_FLAGS,
    ATTR_KV_NEED,
    ATTR_LAUNCHED,
    ATTR_MEMORY,
    ATTR_REASON,
    ATTR_RUNTIME_NEED_GB,
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
            runtime_need: float | None = None, cap: int | None = None, mfs: float | None = None,
            weights: float | None = None, pool_gib: float | None = None, reason: str | None = None) -> None:
    """One launched trial: `n` GPU experts at `chunk`; `free` GiB before the weights, `avail`
    GiB left once started; `pool` KV tokens against the decode workload's `need`; `spare` and
    `runtime_need` GB as the memory model predicted them; `cap` and `mfs` its max-total-tokens
    and mem-fraction-static; `weights` and `pool_gib` the GiB its weights and KV pool took."""
    params = {"n": n, "chunk": chunk}
    memory: dict[str, Any] = {"weight_begin_avail_gib": free}
    if avail is not None:
        memory["available_gpu_mem_gib"] = avail
    if pool is not None:
        memory["kv_tokens"] = pool
    if weights is not None:
        memory["weight_avail_gib"] = free - weights
    if pool_gib is not None:
        memory["kv_size_gib"] = pool_gib
    flags: dict[str, Any] = {"kt-num-gpu-experts": n, "chunked-prefill-size": chunk}
    if cap is not None:
        flags["max-total-tokens"] = cap
    if mfs is not None:
        flags["mem-fraction-static"] = mfs
    attrs: dict[str, Any] = {ATTR_LAUNCHED: True, ATTR_FLAGS: flags, ATTR_MEMORY: memory, ATTR_REASON: reason}
    if spare is not None:
        attrs[ATTR_SPARE_GB] = spare
    if need is not None:
        attrs[ATTR_KV_NEED] = {"decode": need}
    if runtime_need is not None:
        attrs[ATTR_RUNTIME_NEED_GB] = runtime_need
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
    assert start_draws(study).sd == pytest.approx(1.0 * GB_PER_GIB)
    assert start_draws(study).mean({}) == pytest.approx(41.0 * GB_PER_GIB)
    assert start_draws(study).mean({"tensor-parallel-size": 2}) is None  # other ranks, other contexts: not seen
    rebuilt = optuna.trial.create_trial(params={"n": 1}, distributions={"n": DIST["n"]}, values=[1.0], user_attrs={
        ATTR_LAUNCHED: True, ATTR_MEMORY: {"weight_avail_gib": 10.0, "weight_mem_gib": 30.5}})
    assert start_free_gib(rebuilt) == 40.5
    assert available_after_start_gb(rebuilt) is None
    assert start_draws(_study()).sd is None  # nothing launched: no spread


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


def test_where_the_kv_pool_absorbs_the_start_up_draw_only_its_share_stays_free() -> None:
    study = _study()
    for free, left in ((39.0, 1.70), (41.0, 1.90), (40.0, 1.80)):  # the pool took 0.9 of the draw
        _launch(study, 36, 100.0, free=free, avail=left, spare=0.9, runtime_need=0.8, mfs=0.9)
    for free, left in ((40.5, 3.05), (39.5, 2.95)):
        _launch(study, 32, 96.0, free=free, avail=left, spare=1.3, runtime_need=0.8, mfs=0.9)
    fast = next(g for g in repeat_groups(study) if g.first.params["n"] == 36)
    assert fast.start_spare == pytest.approx(1.8 * GB_PER_GIB - 0.8)
    assert fast.free_sd == pytest.approx(start_draws(study).sd)
    assert fast.low_start_spare == pytest.approx(fast.start_spare - 0.1 * THIN_Z * fast.free_sd)
    assert not fast.thin_start and pick(study, ConfirmSpec())[0].params["n"] == 36
    unknown = _study()  # without mem-fraction-static in the flags, the whole draw may stay free
    for free, left in ((39.0, 1.70), (41.0, 1.90), (40.0, 1.80)):
        _launch(unknown, 36, 100.0, free=free, avail=left, spare=0.9, runtime_need=0.8)
    fast = repeat_groups(unknown)[0]
    assert fast.start_spare == pytest.approx((1.7 + 0.9 + 1.8) / 3 * GB_PER_GIB - 0.8)  # a larger draw: no help
    assert fast.thin_start


def test_memory_to_spare_is_what_its_own_starts_left_less_what_its_forwards_take() -> None:
    study = _study()
    for free in (39.0, 41.0, 40.0, 40.0):  # a capped KV pool: what start-up leaves follows the draw
        _launch(study, 36, 100.0, chunk=512, free=free, avail=free - 36.0, spare=3.0, runtime_need=0.5, pool=40000, cap=40000)
    for free in (39.5, 40.5):
        # the model's spare was predicted at another draw; its own starts left 2.5 GiB on average
        _launch(study, 32, 104.0, free=free, avail=free - 37.5, spare=0.9, runtime_need=0.8, pool=40000, cap=40000)
    groups = {g.first.params["n"]: g for g in repeat_groups(study)}
    assert groups[32].start_spare == pytest.approx(2.5 * GB_PER_GIB - 0.8)
    assert not groups[32].thin_start and not groups[36].thin_start
    assert pick(study, ConfirmSpec())[0].params["n"] == 32
    heavy = _study()
    for free in (39.0, 41.0, 40.0, 40.0):
        _launch(heavy, 36, 100.0, chunk=512, free=free, avail=free - 36.0, spare=3.0, runtime_need=0.5, pool=40000, cap=40000)
    for free in (39.5, 40.5):
        _launch(heavy, 32, 104.0, free=free, avail=free - 37.5, spare=0.9, runtime_need=2.2, pool=40000, cap=40000)  # forwards take most of it
    groups = {g.first.params["n"]: g for g in repeat_groups(heavy)}
    assert groups[32].start_spare == pytest.approx(0.5 * GB_PER_GIB)  # its own least start ran: no more than that
    assert groups[32].thin_start
    assert pick(heavy, ConfirmSpec())[0].params["n"] == 36


def test_a_pool_capped_by_max_total_tokens_leaves_the_draw_free_until_the_profile_s_surplus_is_used() -> None:
    def study_of(**memory: float) -> optuna.Study:
        study = _study()
        for free, left, pool in ((39.0, 1.70, 30000), (41.0, 1.90, 33000), (40.0, 1.80, 31500), (40.0, 1.80, 31400)):
            _launch(study, 36, 100.0, free=free, avail=left, pool=pool, runtime_need=0.8, cap=40000, mfs=0.9)  # profiled
        for free in (39.5, 40.5):
            _launch(study, 32, 104.0, free=free, avail=free - 38.0, pool=40000, runtime_need=0.9, cap=40000, mfs=0.9,
                    **memory)
        return study

    study = study_of()
    groups = {g.first.params["n"]: g for g in repeat_groups(study)}
    assert pool_capped(groups[32].first) and not pool_capped(groups[36].first)
    assert not groups[36].thin_start
    # 2 GiB left at the study's mean draw of 40 GiB; without the profile's figures a short start loses all of its shortfall
    capped = groups[32]
    assert capped.start_spare == pytest.approx(2.0 * GB_PER_GIB - 0.9)
    assert capped.low_start_spare == pytest.approx(capped.start_spare - THIN_Z * capped.free_sd) and capped.thin_start
    assert pick(study, ConfirmSpec())[0].params["n"] == 36
    # Weights of 32.5 GiB and a 3 GiB pool: at 40 GiB the profile had 40 - 32.5 - 4 = 3.5 GiB for a 3 GiB pool, so a
    # draw 0.5 / 0.9 GiB smaller keeps the cap; below that the pool shrinks and only a tenth of the shortfall is lost.
    study = study_of(weights=32.5, pool_gib=3.0)
    capped = next(g for g in repeat_groups(study) if g.first.params["n"] == 32)
    short = THIN_Z * capped.free_sd
    room = 0.5 / 0.9 * GB_PER_GIB
    assert capped.low_start_spare == pytest.approx(capped.start_spare - room - 0.1 * (short - room))
    assert not capped.thin_start and pick(study, ConfirmSpec())[0].params["n"] == 32


def test_one_launch_on_a_low_draw_is_read_at_the_study_s_mean_draw() -> None:
    study = _study()
    for free in (39.0, 41.0, 40.0, 40.0, 40.5, 39.5):
        _launch(study, 100, 80.0, free=free, avail=free - 36.0, pool=40000, runtime_need=0.9, cap=40000)  # 4 GiB left
    _launch(study, 120, 100.0, free=38.4, avail=1.4, pool=40000, runtime_need=0.9, cap=40000)  # a low draw
    fast = next(g for g in repeat_groups(study) if g.first.params["n"] == 120)
    mean_free = (40.0 * 6 + 38.4) / 7
    assert fast.start_spare == pytest.approx((1.4 + mean_free - 38.4) * GB_PER_GIB - 0.9)
    assert not fast.thin_start  # its own start alone (1.4 GiB left) would call it thin
    assert pick(study, ConfirmSpec())[0].params["n"] == 120


def test_kttune_best_says_what_an_average_and_a_short_start_leave_to_spare() -> None:
    from tuner.report.text import certainty_lines

    study = _study()
    for free in (39.0, 41.0, 40.0, 40.0):
        _launch(study, 36, 100.0, free=free, avail=free - 38.0, pool=40000, runtime_need=0.5, cap=40000)
    lines = certainty_lines(study, ConfirmSpec())
    group = repeat_groups(study)[0]
    assert group.start_spare is not None and group.low_start_spare is not None and group.free_sd is not None
    spare = next(line for line in lines if "to spare at run time" in line)
    assert f"{group.start_spare:.2f} GB" in spare and f"{group.low_start_spare:.2f} GB on one 2 sd short" in spare
    assert f"sd {group.free_sd:.2f} GB" in spare and "thin" in spare  # 2 GiB left, 0.5 GB needed, sd 0.8 GiB
