from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.bench.client import build_bench_argv, read_last_result, rescale_metrics
from tuner.config import load_space

LINE = {"backend": "sglang", "duration": 412.66, "completed": 37, "input_throughput": 0.9,
        "output_throughput": 45.91, "mean_ttft_ms": 3552.0, "median_itl_ms": 797.9,
        "server_info": {"x": 1}, "tag": None}


def test_last_appended_line_wins(tmp_path: Path) -> None:
    f = tmp_path / "out.jsonl"
    f.write_text(json.dumps({"completed": 1}) + "\n")
    assert read_last_result(f, lines_before=1) is None  # nothing new since
    with f.open("a") as fh:
        fh.write(json.dumps(LINE) + "\n")
    assert read_last_result(f, lines_before=1)["output_throughput"] == 45.91
    assert read_last_result(tmp_path / "missing.jsonl") is None


def test_metrics_keep_numbers_only_and_undo_a_time_scale() -> None:
    m = rescale_metrics(LINE, 1.0)
    assert m["output_throughput"] == 45.91 and "server_info" not in m and "tag" not in m
    scaled = {**LINE, "output_throughput": 45.91 / 0.02, "duration": 412.66 * 0.02, "median_itl_ms": 797.9 * 0.02}
    m = rescale_metrics(scaled, 0.02)
    assert m["output_throughput"] == pytest.approx(45.91)
    assert m["duration"] == pytest.approx(412.66)
    assert m["median_itl_ms"] == pytest.approx(797.9)
    assert m["completed"] == 37


def test_bench_argv_is_the_seed_command(tmp_path: Path) -> None:
    space = load_space("search_spaces/kimi-k2-thinking-8xl20.yaml", check_paths=False)
    argv = build_bench_argv(space.bench, space.workload("decode"), host="127.0.0.1", port=60000,
                            output_file=tmp_path / "o.jsonl", tokenizer="/models/Kimi-K2-Thinking")
    joined = " ".join(argv)
    for piece in ["-m sglang.bench_serving", "--backend sglang", "--host 127.0.0.1", "--port 60000",
                  "--num-prompts 37", "--random-input-len 10", "--random-output-len 512",
                  "--random-range-ratio 1.0", "--dataset-name random", f"--output-file {tmp_path / 'o.jsonl'}",
                  "--tokenizer /models/Kimi-K2-Thinking"]:
        assert piece in joined, piece
