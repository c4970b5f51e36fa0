from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_bench_client
from tuner.bench import SGLANG_KT_MODULE, UPSTREAM_MODULE, goodput_slos, probe_bench_modules, resolve_bench
from tuner.bench.client import build_bench_argv, read_last_result, rescale_metrics
from tuner.config import SloSpec, load_space
from tuner.errors import ConfigError

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
    assert space.bench.module is None  # found in bench.python before the first launch
    space = resolve_bench(space, probe={"sglang.bench_serving": {"goodput": False}})  # what sglang-kt 0.7.2 has
    argv = build_bench_argv(space.bench, space.workload("decode"), host="127.0.0.1", port=60000,
                            output_file=tmp_path / "o.jsonl", tokenizer="/models/Kimi-K2-Thinking")
    joined = " ".join(argv)
    for piece in ["-m sglang.bench_serving", "--backend sglang", "--host 127.0.0.1", "--port 60000",
                  "--num-prompts 37", "--random-input-len 10", "--random-output-len 512",
                  "--random-range-ratio 1.0", "--dataset-name random", f"--output-file {tmp_path / 'o.jsonl'}",
                  "--tokenizer /models/Kimi-K2-Thinking"]:
        assert piece in joined, piece


def test_an_ipv6_server_host_reaches_the_client_as_a_url(tmp_path: Path) -> None:
    """The client joins --host and --port without brackets; an IPv6 address goes as --base-url."""
    space = resolve_bench(load_space("search_spaces/kimi-k2-thinking-8xl20.yaml", check_paths=False),
                          probe={"sglang.bench_serving": {"goodput": False}})
    argv = build_bench_argv(space.bench, space.workload("decode"), host="::1", port=60000,
                            output_file=tmp_path / "o.jsonl", tokenizer=None)
    assert argv[argv.index("--base-url") + 1] == "http://[::1]:60000"
    v4 = build_bench_argv(space.bench, space.workload("decode"), host="127.0.0.1", port=60000,
                          output_file=tmp_path / "o.jsonl", tokenizer=None)
    assert "--base-url" not in v4


@pytest.mark.parametrize("seed", [1, 42, 7])
def test_kttune_always_passes_the_seed_itself(tmp_path: Path, seed: int) -> None:
    """The clients' defaults differ (sglang-kt 1, upstream 42): the argv never leaves it to them."""
    space = load_space("search_spaces/kimi-k2-thinking-8xl20.yaml", check_paths=False)
    space = resolve_bench(space, probe={UPSTREAM_MODULE: {"goodput": True}, SGLANG_KT_MODULE: {"goodput": False}})
    bench = dataclasses.replace(space.bench, seed=seed)
    for w in space.workloads:
        argv = build_bench_argv(bench, w, host="127.0.0.1", port=1, output_file=tmp_path / "o.jsonl", tokenizer=None)
        assert argv[argv.index("--seed") + 1] == str(seed) and argv.count("--seed") == 1


def test_slos_map_onto_goodput_only_for_a_client_that_takes_it(tmp_path: Path) -> None:
    slos = (SloSpec("decode", "p99_ttft_ms", max=5000.0), SloSpec("decode", "median_ttft_ms", max=3000.0),
            SloSpec("decode", "mean_tpot_ms", max=900.0), SloSpec("decode", "p90_e2e_latency_ms", max=60000.0),
            SloSpec("decode", "output_throughput", min=40.0), SloSpec("prefill", "p99_ttft_ms", max=9.0))
    assert goodput_slos(slos, "decode") == {"ttft": 3000.0, "tpot": 900.0, "e2el": 60000.0}
    assert goodput_slos(slos, "decode", time_scale=0.02) == {"ttft": 60.0, "tpot": 18.0, "e2el": 1200.0}
    space = load_space("search_spaces/kimi-k2-thinking-8xl20.yaml", check_paths=False)
    space = dataclasses.replace(space, slos=slos)
    up = resolve_bench(space, probe={UPSTREAM_MODULE: {"goodput": True}, SGLANG_KT_MODULE: {"goodput": False}})
    assert up.bench.module == UPSTREAM_MODULE and up.bench.goodput
    argv = build_bench_argv(up.bench, up.workload("decode"), host="h", port=1, output_file=tmp_path / "o", tokenizer=None,
                            slos=slos)
    at = argv.index("--goodput")
    assert argv[at + 1:at + 4] == ["ttft:3000", "tpot:900", "e2el:60000"]
    kt = resolve_bench(space, probe={SGLANG_KT_MODULE: {"goodput": False}})
    assert kt.bench.module == SGLANG_KT_MODULE and "--goodput" not in build_bench_argv(
        kt.bench, kt.workload("decode"), host="h", port=1, output_file=tmp_path / "o", tokenizer=None, slos=slos)
    with pytest.raises(ConfigError, match="^bench.python: .* has neither sglang.benchmark.serving nor sglang.bench_serving"):
        resolve_bench(space, probe={})


@requires_bench_client
def test_the_bench_module_is_found_in_the_sglang_kt_bench_venv() -> None:
    found = probe_bench_modules(str(REPO / ".venv-bench" / "bin" / "python"), {})
    assert set(found) == {SGLANG_KT_MODULE} and found[SGLANG_KT_MODULE]["goodput"] is False
