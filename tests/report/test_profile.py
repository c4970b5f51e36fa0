"""The exported profile is servable: only flags the real server declares, none of the
simulator's, the benchmark-only switches left out unless asked for, and stand-in paths marked."""
from __future__ import annotations

import os
import re
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import REPO, bench_python
from tuner.config import load_space
from tuner.feasibility import FeasibilityGate, launch_flags
from tuner.report.profile import BENCHMARK_ONLY_FLAGS, render_profile, servable_profile
from tuner.sim.args import build_parser
from tuner.storage import ATTR_FLAGS

SIM_SPACES = sorted((REPO / "search_spaces").glob("sim-*.yaml"))


def _trial(flags: dict) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=1.0, user_attrs={ATTR_FLAGS: flags})


def _launched_flags(space_file: Path) -> dict:
    """What a launch of the space's baseline (else each param's first value) recorded."""
    space = load_space(space_file, check_paths=False)
    params = dict(space.baseline or {p.flag: (p.choices[0] if p.choices else p.low) for p in space.params})
    flags = launch_flags(space, params, FeasibilityGate.for_space(space))
    return {**flags, "host": "127.0.0.1", "port": 30001}


def _sglang_server_options() -> set[str]:
    """Option strings declared in the installed sglang-kt's server_args.py (read as text)."""
    python = bench_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("the bench venv (with sglang-kt) is missing in CI")
        pytest.skip("bench client venv missing: run scripts/setup.sh")
    src = next(python.parents[1].glob("lib/python*/site-packages/sglang/srt/server_args.py"))
    return set(re.findall(r'"--([a-z0-9][a-z0-9-]*)"', src.read_text()))


@pytest.mark.parametrize("space_file", SIM_SPACES, ids=lambda p: p.stem)
def test_export_of_every_sim_space_has_only_server_flags(space_file: Path) -> None:
    recorded = _launched_flags(space_file)
    assert any(k.startswith("sim-") for k in recorded)  # the simulator's flags were launched with
    profile = servable_profile(_trial(recorded), simulated=True)
    assert not [k for k in profile.flags if k.startswith("sim-") or k in ("host", "port")]
    assert not set(BENCHMARK_ONLY_FLAGS) & set(profile.flags)
    declared = _sglang_server_options()
    assert set(profile.flags) <= declared, f"flags sglang-kt does not declare: {set(profile.flags) - declared}"
    assert "model-path" in profile.placeholders
    text = render_profile(_trial(recorded), profile, study_name="s", objectives=[])
    assert yaml.safe_load(text) == profile.flags  # comments only around the flags
    assert "PLACEHOLDER" in next(line for line in text.splitlines() if line.startswith("model-path:"))
    for key in profile.dropped:
        assert f"# left out: {key} " in text


def test_the_simulators_flags_are_all_caught_by_the_prefix() -> None:
    parser = build_parser()
    sim_options = {o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--sim")}
    assert sim_options and all(o.startswith("sim-") for o in sim_options)


def test_benchmark_flags_kept_when_asked_and_real_paths_are_not_placeholders() -> None:
    recorded = {"model-path": "/models/Kimi-K2", "disable-radix-cache": True, "kt-num-gpu-experts": 200}
    kept = servable_profile(_trial(recorded), simulated=False, keep_benchmark_flags=True)
    assert kept.flags == recorded and not kept.dropped and not kept.placeholders
    dropped = servable_profile(_trial(recorded), simulated=False)
    assert "disable-radix-cache" in dropped.dropped and "disable-radix-cache" not in dropped.flags


def test_the_header_names_measured_workloads_not_the_probe() -> None:
    from tuner.storage.attrs import METRIC_PREFIX

    metrics = {"decode.output_throughput": 48.6, "decode.median_itl_ms": 761.2, "decode-probe.median_itl_ms": 761.9,
               "prefill.median_itl_ms": 0.0, "prefill.median_ttft_ms": 5849.0}
    trial = optuna.trial.create_trial(value=48.6, user_attrs={ATTR_FLAGS: {"kt-num-gpu-experts": 208},
                                                              **{METRIC_PREFIX + k: v for k, v in metrics.items()}})
    text = render_profile(trial, servable_profile(trial, simulated=False), study_name="s",
                          objectives=["decode.output_throughput"])
    assert "# decode.output_throughput: 48.6" in text and "# decode.median_itl_ms: 761.2" in text
    assert "probe" not in text and "prefill.median_itl_ms" not in text and "# prefill.median_ttft_ms: 5849" in text


def test_tuned_environment_variables_become_a_comment_block_with_the_command() -> None:
    recorded = {"model-path": "/models/Kimi-K2", "kt-num-gpu-experts": 200, "env:KT_RAWINT4_BACKEND": "amx_blocked"}
    profile = servable_profile(_trial(recorded), simulated=False)
    assert profile.env == {"KT_RAWINT4_BACKEND": "amx_blocked"} and "env:KT_RAWINT4_BACKEND" not in profile.flags
    text = render_profile(_trial(recorded), profile, study_name="s", objectives=[])
    assert yaml.safe_load(text) == {"model-path": "/models/Kimi-K2", "kt-num-gpu-experts": 200}
    assert "#   KT_RAWINT4_BACKEND=amx_blocked" in text
    assert ("# launch with: KT_RAWINT4_BACKEND=amx_blocked python -m sglang.launch_server --config THIS_FILE "
            "--host HOST --port PORT") in text
