"""Failures told by their cause, through the simulated server and the real bench client.

A KV pool too small for the workload's prompts: the server answers HTTP 400 "Input length …
exceeds the maximum allowed length", the client's warmup fails, and the trial is a
configuration fault (the sampler learns from it), not an infrastructure FAIL. Text that the
client cannot re-tokenize into the tokens the server counted is a quality failure even with the
quality check off. A server whose forward runs out of GPU memory under load is a memory fault
(`oom`), like an OOM at start-up."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import REPO, requires_bench_client
from tuner.bench import resolve_bench
from tuner.config import QualitySpec, SearchSpace, load_space
from tuner.feasibility import launch_flags
from tuner.outcome import LAUNCH_FAILED, Reason
from tuner.trial import run_trial

pytestmark = [pytest.mark.e2e, requires_bench_client]


def _qwen_with_args(**args: object) -> SearchSpace:
    """The qwen sim space with `args` added, its bench client found as `kttune run` finds it."""
    space = resolve_bench(load_space(REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"))
    return dataclasses.replace(space, server=dataclasses.replace(space.server, args={**space.server.args, **args}))


def test_a_kv_pool_too_small_for_the_prompts_is_a_config_fault(tmp_path: Path) -> None:
    space = _qwen_with_args(**{"max-total-tokens": 1000})
    run = run_trial(space, launch_flags(space, dict(space.baseline or {}), None), tmp_path / "trial")
    assert run.outcome.reason == Reason.REQUEST_TOO_LONG
    assert run.outcome.state == TrialState.COMPLETE and run.outcome.constraints[LAUNCH_FAILED] == 1.0
    assert "exceeds the maximum allowed length (1000 tokens)" in run.outcome.message


def test_text_lost_between_server_and_client_is_a_quality_failure_with_the_check_off(tmp_path: Path) -> None:
    space = _qwen_with_args(**{"sim-fault": "empty_output"})
    space = dataclasses.replace(space, quality=QualitySpec(enabled=False))
    run = run_trial(space, launch_flags(space, dict(space.baseline or {}), None), tmp_path / "trial")
    assert run.outcome.reason == Reason.QUALITY and run.outcome.state == TrialState.COMPLETE
    assert "re-tokenized 0.0% of the" in run.outcome.message
    assert not run.quality  # the quality check did not run: the bench output told


def test_a_forward_that_runs_out_of_memory_under_load_is_a_memory_fault(tmp_path: Path) -> None:
    space = resolve_bench(load_space(REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml"))
    params = {**(space.baseline or {}), "kt-num-gpu-experts": 208, "chunked-prefill-size": 8192}
    run = run_trial(space, launch_flags(space, params, None), tmp_path / "trial")
    assert run.outcome.reason == Reason.OOM, run.outcome.message  # not a bare server_died
    assert "out of memory" in run.outcome.message and "died during the benchmark" in run.outcome.message
    assert run.memory.get("available_gpu_mem_gib") is not None  # started: the OOM came from a forward
