"""Baseline vs pick: every workload's throughput and latency, a gain inside the measured noise
called so, a loss on a metric nothing guarded flagged — in `kttune best` and in the report."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from tests.conftest import REPO
from tuner.config import ConfirmSpec, SloSpec, load_space
from tuner.report.comparison import GAIN, LOSS, NOISE, compare
from tuner.report.data import compute_report
from tuner.report.text import comparison_lines
from tuner.storage.attrs import ATTR_BASELINE, ATTR_FLAGS, ATTR_LAUNCHED, ATTR_REASON, METRIC_PREFIX

SPACE = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"
BASE = {"kt-num-gpu-experts": 16, "kt-cpuinfer": 22, "kt-threadpool-count": 1, "chunked-prefill-size": 4096,
        "max-running-requests": 37}
PICK = {**BASE, "kt-num-gpu-experts": 36}


def _study(decode: tuple[list[float], list[float]], prefill: tuple[list[float], list[float]]) -> optuna.Study:
    space = load_space(SPACE, check_paths=False)
    study = optuna.create_study(directions=space.directions)
    dists = space.distributions()
    for params, dec, pre, baseline in ((BASE, decode[0], prefill[0], True), (PICK, decode[1], prefill[1], False)):
        for d, p in zip(dec, pre):
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, values=[d],
                user_attrs={ATTR_LAUNCHED: True, ATTR_REASON: None, ATTR_FLAGS: dict(params), ATTR_BASELINE: baseline,
                            METRIC_PREFIX + "decode.output_throughput": d, METRIC_PREFIX + "prefill.input_throughput": p,
                            METRIC_PREFIX + "decode.median_ttft_ms": 100.0, METRIC_PREFIX + "prefill.median_ttft_ms": 10.0},
                constraints={"launch_failed": 0.0}))
    return study


def test_a_gain_inside_the_noise_is_called_so_and_an_unguarded_loss_is_flagged() -> None:
    space = replace(load_space(SPACE, check_paths=False), confirm=ConfirmSpec(noise=0.03))
    # decode +6.7 % with repeats 5 % apart on each side; prefill -37 % with repeats 1 % apart
    study = _study(([45.83, 43.37], [48.5, 46.0]), ([600.0, 606.0], [380.0, 383.0]))
    base = next(t for t in study.trials if t.user_attrs[ATTR_BASELINE])
    pick = next(t for t in study.trials if not t.user_attrs[ATTR_BASELINE])
    rows = {c.metric: c for c in compare(space, study, base, pick)}
    assert rows["decode.output_throughput"].verdict == NOISE and rows["decode.output_throughput"].objective
    assert rows["decode.output_throughput"].change_pct == pytest.approx(100 * (47.25 / 44.6 - 1))
    assert rows["prefill.input_throughput"].verdict == LOSS and rows["prefill.input_throughput"].flagged
    assert set(rows) >= {"decode.median_ttft_ms", "prefill.median_ttft_ms"}  # latency of every workload
    console = Console(record=True, width=200)
    for line in comparison_lines(space, study):
        console.print(line, markup=False)
    text = console.export_text()
    assert "within noise" in text and "warning: worse beyond the noise and guarded by no SLO: prefill.input_throughput" in text
    assert compute_report(space, study).comparison == tuple(rows.values())
    # the same loss under an SLO is shown, not flagged
    guarded = replace(space, slos=(SloSpec("prefill", "input_throughput", min=100.0),))
    row = next(c for c in compare(guarded, study, base, pick) if c.metric == "prefill.input_throughput")
    assert row.verdict == LOSS and not row.flagged and row.slo


def test_a_gain_beyond_the_noise_is_a_gain(tmp_path: Path) -> None:
    space = load_space(SPACE, check_paths=False)
    study = _study(([40.0, 40.2], [47.0, 47.3]), ([600.0, 601.0], [601.0, 600.0]))
    base = next(t for t in study.trials if t.user_attrs[ATTR_BASELINE])
    pick = next(t for t in study.trials if not t.user_attrs[ATTR_BASELINE])
    rows = {c.metric: c for c in compare(space, study, base, pick)}
    assert rows["decode.output_throughput"].verdict == GAIN
    assert rows["prefill.input_throughput"].verdict == NOISE
