"""A request refused as too long for the KV pool or the context is the configuration's fault.
The messages are read from the installed sglang-kt's own source (as text, never imported):
when a release rewords them, this test is the first to notice."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import REPO, bench_python
from tuner.bench import REQUEST_TOO_LONG, request_refusal
from tuner.config import load_space
from tuner.outcome import LAUNCH_FAILED, Fault, Reason, failure
from tuner.sim.engine import Engine
from tuner.sim.scenario import load_scenario


def _sglang_source(relative: str) -> str:
    python = bench_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("the bench venv (with sglang-kt) is missing in CI")
        pytest.skip("bench client venv missing: run scripts/setup.sh")
    return next(python.parents[1].glob(f"lib/python*/site-packages/sglang/srt/{relative}")).read_text()


def _rendered_messages(source: str, function: str) -> list[str]:
    """Every f-string in `function`, its placeholders filled with 1234."""
    tree = ast.parse(source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function)
    out = []
    for node in ast.walk(fn):
        if isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "1234" for v in node.values))
    return out


def test_the_schedulers_and_tokenizers_refusals_match() -> None:
    scheduler = _rendered_messages(_sglang_source("managers/utils.py"), "validate_input_length")
    assert any(REQUEST_TOO_LONG.search(m) for m in scheduler), scheduler
    tokenizer = _rendered_messages(_sglang_source("managers/tokenizer_manager.py"), "_validate_one_request")
    assert any("is longer than the model's context length" in m and REQUEST_TOO_LONG.search(m) for m in tokenizer)
    assert any("Requested token count exceeds" in m and REQUEST_TOO_LONG.search(m) for m in tokenizer)


def test_the_simulator_refuses_in_sglangs_words() -> None:
    space = load_space(REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml", check_paths=False)
    from tuner.feasibility import launch_flags
    from tuner.server import flag_args
    from tuner.sim.args import parse_args, to_sim_config

    flags = {**launch_flags(space, dict(space.baseline or {}), None), "max-total-tokens": 1000}
    cfg = to_sim_config(parse_args(flag_args(flags) + ["--host", "127.0.0.1", "--port", "1"]))
    engine = Engine(load_scenario("qwen3-30b-a3b-1x4090"), cfg, noise_sigma=0.0, seed=0)
    message = engine.submit("r", 1024, 1)
    assert message is not None and REQUEST_TOO_LONG.search(message)


def test_the_bench_log_line_is_found_and_the_trial_is_a_config_fault(tmp_path: Path) -> None:
    log = tmp_path / "bench-prefill.log"
    log.write_text("Starting warmup with 1 sequences...\nTraceback (most recent call last):\n"
                   "ValueError: Warmup failed - Please make sure benchmark arguments are correctly specified. "
                   'Error: Bad Request: {"error": {"message": "Input length (1025 tokens) exceeds the maximum '
                   'allowed length (1000 tokens). Use a shorter input or enable --allow-auto-truncate."}}\n')
    line = request_refusal(log)
    assert line is not None and line.startswith("ValueError: Warmup failed") and "1000 tokens" in line
    (tmp_path / "ok.log").write_text("Warmup completed with 1 sequences. Starting main benchmark run...\n")
    assert request_refusal(tmp_path / "ok.log") is None
    assert Reason.REQUEST_TOO_LONG.fault is Fault.CONFIG
    space = load_space(REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml", check_paths=False)
    told = failure(space, Reason.REQUEST_TOO_LONG, line)
    assert told.state == TrialState.COMPLETE and told.constraints[LAUNCH_FAILED] == 1.0
