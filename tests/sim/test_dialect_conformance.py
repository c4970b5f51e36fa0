"""Conformance to the real servers: format strings, payload keys, routes and flags taken from the
source of sglang-kt 0.7.2 (installed in .venv-bench) and upstream sglang 0.5.23 (its wheel, fetched
by scripts/fetch-upstream-sglang.sh into .cache/wheels/), read as TEXT and never imported. The
real log lines are rendered from their f-strings with known values; kttune's parsers must read those
values back, and the simulator's line of each dialect must have the same shape. When a future
version changes a line, this test is the first to notice.

Locally a missing source is a skip with the reason; in CI (CI=true) it is a failure.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import REPO
from tuner.bench import SGLANG_KT_MODULE, UPSTREAM_MODULE, MetricKind, metric_kind, probe_bench_modules
from tuner.server import SERVER_INFO_ENDPOINTS, memory_from_server_info
from tuner.server.logscan import classify_failure, cuda_graph_end, kv_cache_allocated, weight_load_end
from tuner.sim.args import UPSTREAM_LACKS, build_parser
from tuner.sim.dialect import graph_split, memory_usage, startup_lines
from tuner.sim.perfmodel.startup import startup_check
from tuner.sim.scenario import load_scenario

KT_ROOT = REPO / ".venv-bench" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "sglang"
WHEELS = REPO / ".cache" / "wheels"


def _missing(what: str) -> None:
    message = f"{what} (run scripts/setup.sh and scripts/fetch-upstream-sglang.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Source:
    """One package's files as text: ``read("srt/...py")``."""

    def __init__(self, read: Callable[[str], str]) -> None:
        self.read = read


@pytest.fixture(scope="module")
def kt() -> Source:
    if not (KT_ROOT / "srt" / "server_args.py").is_file():
        _missing(f"sglang-kt 0.7.2 source not found at {KT_ROOT}")
    return Source(lambda rel: (KT_ROOT / rel).read_text())


@pytest.fixture(scope="module")
def up() -> Source:
    wheels = sorted(WHEELS.glob("sglang-0.5.23-*.whl"))
    if not wheels:
        _missing(f"upstream sglang 0.5.23 wheel not found in {WHEELS}")
    z = zipfile.ZipFile(wheels[0])
    return Source(lambda rel: z.read(f"sglang/{rel}").decode())


# ------------------------------------------------------------------ f-strings of the real lines


class _Names(dict[str, Any]):
    def __missing__(self, key: str) -> Any:  # a name the source now uses that this test does not know
        raise KeyError(f"the real format string uses {key!r}: update the test's sample values")


def render(source: str, marker: str, names: Mapping[str, Any], *, also: str = "") -> list[str]:
    """Every f-string of `source` whose literal text contains `marker` (and `also`), rendered with `names`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.JoinedStr):
            continue
        text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
        if marker in text and also in text:
            code = compile(ast.Expression(node), "<real>", "eval")
            out.append(eval(code, {"__builtins__": {"type": type, "round": round}}, _Names(names)))  # noqa: S307
    return out


class DeepseekV3ForCausalLM:
    pass


def skeleton(line: str) -> str:
    """A line's shape: numbers, lists and the model's type name blanked."""
    line = re.sub(r"type=[^,]+", "type=T", line)
    line = re.sub(r"\[[0-9, ]*\]", "[#]", line)
    return re.sub(r"[0-9]+(?:\.[0-9]+)?", "#", line)


def sim_lines(dialect: str, scenario: str) -> list[str]:
    st = startup_check(load_scenario(scenario), _cfg(scenario))
    assert st.ok
    return startup_lines(["Load weight begin. avail mem=40.00 GB", *st.log_lines], dialect, captured_bs=24)


def _cfg(scenario: str) -> Any:
    from tuner.sim.args import parse_args, to_sim_config

    args = parse_args(["--model-path", "/m", "--sim-scenario", scenario, "--kt-weight-path", "/w", "--kt-cpuinfer", "8",
                       "--kt-threadpool-count", "1", "--kt-num-gpu-experts", "8", "--max-total-tokens", "8000",
                       "--max-running-requests", "16", "--chunked-prefill-size", "2048"])
    return to_sim_config(args)


MLA, GQA = "deepseek-v3-4xh100", "qwen3-30b-a3b-1x4090"


def _kv_names() -> dict[str, Any]:
    return {"num_tokens": 37000, "k_size_GB": 1.25, "v_size_GB": 1.5, "kv_size_GB": 2.42, "cache_name": "KV Cache",
            "self": SimpleNamespace(dtype="torch.bfloat16", post_capture_active=False)}


@pytest.mark.parametrize("dialect", ["sglang-kt", "upstream"])
def test_kv_lines_are_read_as_printed_and_the_simulator_prints_them(dialect: str, request: pytest.FixtureRequest) -> None:
    src: Source = request.getfixturevalue("kt" if dialect == "sglang-kt" else "up")
    lines = render(src.read("srt/mem_cache/memory_pool.py"), "#tokens: ", _kv_names(), also=" GB")
    real = [ln for ln in lines if "KV Cache is allocated" in ln]
    assert len(real) == 2, lines  # MHA (K and V) and MLA (one pool)
    assert {kv_cache_allocated(ln) for ln in real} == {(37000, 2.75), (37000, 2.42)}
    assert ("dtype: torch.bfloat16" in real[0]) is (dialect == "upstream")
    if dialect == "upstream":  # post-capture sizing and a labelled pool read the same
        va = render(src.read("srt/mem_cache/memory_pool.py"), "#tokens: ", also=" GB", names=
                    {**_kv_names(), "cache_name": "SWA KV Cache", "self": SimpleNamespace(dtype="torch.float8_e4m3fn",
                                                                                           post_capture_active=True)})
        assert all("SWA KV Cache VA upper bound. dtype: torch.float8_e4m3fn" in ln for ln in va)
        assert {kv_cache_allocated(ln) for ln in va} == {(37000, 2.75), (37000, 2.42)}
    for scenario, shape in ((GQA, "K size"), (MLA, "KV size")):
        sim = next(ln for ln in sim_lines(dialect, scenario) if "KV Cache" in ln)
        assert skeleton(sim) == skeleton(next(ln for ln in real if shape + ":" in ln)), (sim, real)


def test_graph_lines_sglang_kt(kt: Source) -> None:
    names = {"graph_backend": {"cuda": "cuda graph"}, "after_mem": 1.69, "before_mem": 2.30, "tic": 1.0,
             "time": SimpleNamespace(perf_counter=lambda: 20.12),
             "mem_usage": 0.2, "self": SimpleNamespace(device="cuda", graph_mem_usage=0.61)}
    real = [ln for ln in render(kt.read("srt/model_executor/model_runner.py"), " end. Time elapsed: ", names)
            if "mem usage=" in ln and "piecewise" not in ln.lower()]
    assert real == ["Capture cuda graph end. Time elapsed: 19.12 s. mem usage=0.61 GB. avail mem=1.69 GB."]
    assert cuda_graph_end(real[0]) == (0.61, 1.69)
    sim = next(ln for ln in sim_lines("sglang-kt", MLA) if "graph end" in ln)
    assert skeleton(sim) == skeleton(real[0])


def test_graph_lines_upstream_one_per_graph(up: Source) -> None:
    text = up.read("srt/model_executor/model_runner_components/cuda_graph_setup.py")
    names = {"graph_backend": {"cuda": "CUDA graph"}, "model_runner": SimpleNamespace(device="cuda"),
             "runner": SimpleNamespace(capture_bs=[1, 2, 4, 8]), "capture_time": 9.5, "memory_usage_gb": 0.32,
             "mem_usage": 0.10, "after_mem": 1.92, "capture_name": "target decode"}
    real = [ln for ln in render(text, " end. ", names) if "mem usage=" in ln]
    assert len(real) == 2, real  # the prefill graph and the decode graph
    decode = next(ln for ln in real if "bs=" in ln)
    prefill = next(ln for ln in real if "bs=" not in ln)
    assert decode.startswith("Capture target decode CUDA graph end. bs=[1, 2, 4, 8], elapsed=9.50 s, mem usage=0.32 GB")
    assert cuda_graph_end(decode) == (0.32, 1.92) and cuda_graph_end(prefill) == (0.10, 1.92)
    sim = [ln for ln in sim_lines("upstream", MLA) if "graph end" in ln]
    assert [skeleton(ln) for ln in sim] == [skeleton(decode), skeleton(prefill.replace("target decode", "target prefill"))]
    # both graphs count: a rank's graph memory is their sum
    from tuner.server import parse_memory_lines

    got = parse_memory_lines("\n".join(f"[2026-01-01 00:00:00 TP0] {ln}" for ln in sim))["cuda_graph_mem_gib"]
    assert got == pytest.approx(sum(cuda_graph_end(ln)[0] or 0 for ln in sim))
    failed = [ln for ln in render(up.read("srt/model_executor/runner/prefill_cuda_graph_runner.py"), "graph failed",
                                  {"e": "CUDA out of memory", "prefill_failure_msg": lambda _b: "",
                                   "self": SimpleNamespace(prefill_backend_name="full")}) if ln.startswith("Capture")]
    assert failed and all(classify_failure(f"[x TP0] {ln}") == "cuda_graph_failed" for ln in failed)


@pytest.mark.parametrize("dialect", ["sglang-kt", "upstream"])
def test_weight_lines(dialect: str, request: pytest.FixtureRequest) -> None:
    src: Source = request.getfixturevalue("kt" if dialect == "sglang-kt" else "up")
    names = {"after_avail_memory": 4.80, "tic_total": 1.0, "time": SimpleNamespace(perf_counter=lambda: 122.0),
             "quant_str": "", "self": SimpleNamespace(weight_load_mem_usage=42.11, weight_load_time=121.0,
                                                      dtype="torch.bfloat16", model=DeepseekV3ForCausalLM())}
    real = [ln for ln in render(src.read("srt/model_executor/model_runner.py"), "Load weight end. ", names)]
    assert len(real) == 1 and weight_load_end(real[0]) == (4.80, 42.11)
    sim = next(ln for ln in sim_lines(dialect, MLA) if ln.startswith("Load weight end"))
    assert skeleton(sim) == skeleton(real[0])
    begin = render(src.read("srt/model_executor/model_runner.py"), "Load weight begin. ",
                   {"get_available_gpu_memory": lambda *a: 46.91, "self": SimpleNamespace(device="cuda", gpu_id=0)})
    assert begin == ["Load weight begin. avail mem=46.91 GB"]


# ------------------------------------------------------------------ payloads, routes, flags


def _dict_keys(source: str, where: Callable[[ast.AST], bool]) -> set[str]:
    for node in ast.walk(ast.parse(source)):
        if where(node):
            value = node.value if isinstance(node, (ast.Assign, ast.Return)) else node
            if isinstance(value, ast.Dict):
                return {k.value for k in value.keys if isinstance(k, ast.Constant)}
    raise AssertionError("the memory_usage dict is gone from the source")


def test_memory_usage_payload_keys(kt: Source, up: Source) -> None:
    def assigns_memory_usage(node: ast.AST) -> bool:
        return isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                                                    and t.slice.value == "memory_usage" for t in node.targets)

    kt_keys = _dict_keys(kt.read("srt/managers/scheduler.py"), assigns_memory_usage)
    up_source = up.read("srt/managers/scheduler_components/memory_usage.py")
    tree = ast.parse(up_source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "build_memory_usage")
    up_keys = _dict_keys(ast.unparse(fn), lambda n: isinstance(n, ast.Return))
    sim_kt = memory_usage("sglang-kt", weight=40.0, kvcache=2.4, token_capacity=37000, graph=0.6, startup_available=1.7)
    sim_up = memory_usage("upstream", weight=40.0, kvcache=2.4, token_capacity=37000, graph=0.6, startup_available=1.7)
    assert set(sim_kt) == kt_keys == {"weight", "kvcache", "token_capacity", "graph"}
    assert set(sim_up) == up_keys and "startup_available" in up_keys
    phases = ast.literal_eval(re.search(r"GRAPH_MEMORY_USAGE_KEYS = (\([^)]*\))",
                                        up.read("srt/model_executor/graph_memory_usage.py")).group(1))
    assert set(sim_up["graph"]) == set(phases)
    for payload, available in ((sim_kt, None), (sim_up, 1.7)):
        got = memory_from_server_info({"internal_states": [{"memory_usage": payload}]})
        assert got["kv_tokens"] == 37000 and got["weight_mem_gib"] == 40.0
        assert got["cuda_graph_mem_gib"] == pytest.approx(sum(graph_split(0.6)) if payload is sim_up else 0.6)
        assert got.get("available_gpu_mem_gib") == available


def test_server_info_routes_and_the_clients_that_call_them(kt: Source, up: Source) -> None:
    from tuner.sim.server.routes import build_app

    for src in (kt, up):
        routes = set(re.findall(r'@app\.(?:get|api_route)\("(/(?:get_)?server_info)"', src.read("srt/entrypoints/http_server.py")))
        assert routes == {"/server_info", "/get_server_info"}
        assert SERVER_INFO_ENDPOINTS[0] in routes
    assert '"/get_server_info"' in kt.read("bench_serving.py")  # sglang-kt's client
    assert '"/server_info"' in up.read("benchmark/serving.py")  # upstream's
    app = build_app(SimpleNamespace(log=None))  # type: ignore[arg-type]
    served = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert {"/server_info", "/get_server_info"} <= served


def test_kv_pool_is_free_memory_less_a_share_of_the_draw_capped_by_max_total_tokens(kt: Source, up: Source) -> None:
    """What `tuner.capacity.left_at_draw_gb` and `pool_capped` rest on, in both servers' source:
    the pool's budget is the memory free after the weights less (1 - mem-fraction-static) of what
    was free before them, and max-total-tokens, where smaller, caps it."""
    def flat(text: str) -> str:
        return re.sub(r"\s+", "", text)

    kt_runner = flat(kt.read("srt/model_executor/model_runner_kv_cache_mixin.py"))
    assert "rest_memory=available_gpu_memory-self.total_gpu_memory*(1-self.mem_fraction_static)" in kt_runner
    assert "self.max_total_num_tokens=min(self.max_total_num_tokens,max_total_tokens_configured)" in kt_runner
    assert "self.total_gpu_memory=self.init_torch_distributed()" in flat(kt.read("srt/model_executor/model_runner.py"))
    up_pool = flat(up.read("srt/mem_cache/kv_cache_configurator.py"))
    assert "slack_gb=pre_model_load_memory*(1-get_schedule().mem_fraction_static)" in up_pool
    assert "token_capacity=min(token_capacity,user_limit)" in up_pool
    # Upstream re-sizes the pool after graph capture to the same share of the pre-load figure.
    resize = flat(up.read("srt/model_executor/model_runner_components/kv_pool_runtime.py"))
    assert "headroom_gb=model_runner.pre_model_load_memory*(1-model_runner.mem_fraction_static)" in resize


def test_kt_flags_of_each_parser(kt: Source, up: Source) -> None:
    real_kt = set(re.findall(r'"(--(?:record-)?kt-[a-z-]+)"', kt.read("srt/server_args.py")))
    sim_kt = {f for a in build_parser("sglang-kt")._actions for f in a.option_strings if "kt-" in f}
    assert sim_kt <= real_kt
    fields = re.findall(r"^\s+(kt_\w+)\s*:", up.read("srt/arg_groups/fields/exec_.py"), flags=re.M)
    real_up = {"--" + f.replace("_", "-") for f in fields}
    sim_up = {f for a in build_parser("upstream")._actions for f in a.option_strings if "kt-" in f}
    assert sim_up == real_up and len(real_up) == 6
    assert not real_up & set(UPSTREAM_LACKS) and set(UPSTREAM_LACKS) <= real_kt


def test_bench_clients(kt: Source, up: Source, tmp_path: Path) -> None:
    seed = r'"--seed", type=int, default=(\d+)'
    assert re.search(seed, kt.read("bench_serving.py")).group(1) == "1"  # type: ignore[union-attr]
    assert re.search(seed, up.read("benchmark/serving.py")).group(1) == "42"  # type: ignore[union-attr]
    goodput = up.read("benchmark/goodput.py")
    for field in ("request_goodput", "slo_attainment"):
        assert re.search(rf"^\s+{field}: float", goodput, flags=re.M)
    assert metric_kind("request_goodput") is MetricKind.RATE and metric_kind("p95_ttft_ms") is MetricKind.TIME
    assert '"--goodput"' in up.read("benchmark/serving.py") and '"--goodput"' not in kt.read("bench_serving.py")
    # The module finder on upstream's real layout (the files only: found, not imported).
    for rel in ("__init__.py", "bench_serving.py", "benchmark/__init__.py", "benchmark/serving.py"):
        (tmp_path / "sglang" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sglang" / rel).write_text(up.read(rel))
    found = probe_bench_modules(sys.executable, {"PYTHONPATH": str(tmp_path)})
    assert set(found) == {UPSTREAM_MODULE, SGLANG_KT_MODULE} and found[UPSTREAM_MODULE]["goodput"] is True
