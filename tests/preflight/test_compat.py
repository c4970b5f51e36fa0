"""Compatibility check: --help parsing, the cache, and refusing flags against the real
simulator and the real sglang-kt bench client."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_bench_client
from tuner.config import Workload, load_space
from tuner.errors import ConfigError
from tuner.preflight.compat import HelpCache, bench_flags, check_space_compat, parse_help_flags, server_flags

SIM_SPACES = sorted((REPO / "search_spaces").glob("sim-*.yaml"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> HelpCache:
    """One cache for the tests against the real sim and bench client (their --help is slow)."""
    return HelpCache(cache_dir=tmp_path_factory.mktemp("help-cache"))


def _help_of(parser: argparse.ArgumentParser) -> str:
    return parser.format_help()


def test_parse_help_reads_options_not_prose() -> None:
    p = argparse.ArgumentParser(prog="launch_server.py")
    p.add_argument("--model-path", "--model", required=True, help="the model; see also --tokenizer-path")
    p.add_argument("--kt-method", choices=["AMXINT4", "RAWINT4", "front-loading"], default="AMXINT4",
                   help="a very long help text that wraps and mentions --kt-amx-weight-path, which was removed "
                        "a while ago, and then keeps going so that the wrapped line starts with "
                        "--kt-amx-method as well")
    p.add_argument("--kt-numa-nodes", type=int, nargs="+")
    p.add_argument("--enable-mixed-chunk", action="store_true")
    p.add_argument("--a-flag-whose-invocation-is-very-long-indeed", metavar="A_VERY_LONG_METAVAR_NAME")
    g = p.add_argument_group("simulator", "flags mentioned here like --not-an-option are prose")
    g.add_argument("--sim-scenario")
    flags = parse_help_flags(_help_of(p))
    assert flags == {"--help", "--model-path", "--model", "--kt-method", "--kt-numa-nodes", "--enable-mixed-chunk",
                     "--a-flag-whose-invocation-is-very-long-indeed", "--sim-scenario"}


def test_parse_help_of_python_313_style_and_bare_usage() -> None:
    text = ("usage: x [-h] [--foo FOO] --bar BAR\n\noptions:\n  -h, --help  show help\n"
            "  --foo, -f FOO  the foo\n  --bar BAR\n")
    assert parse_help_flags(text) == {"--help", "--foo", "--bar"}
    assert parse_help_flags("no options here\n") == frozenset()


@pytest.mark.parametrize("space_path", SIM_SPACES, ids=lambda p: p.stem)
@requires_bench_client
def test_shipped_sim_spaces_pass_against_the_sim_and_sglang_kt_client(space_path: Path, shared_cache: HelpCache) -> None:
    space = load_space(space_path)
    report = check_space_compat(space, cache=shared_cache)
    dialect = space.server.args.get("sim-dialect", "sglang-kt")
    assert report.dialect.name == dialect and report.dialect.simulated and report.server_flags_from == "parser"
    assert report.space.bench.module == "sglang.bench_serving"  # found in .venv-bench: sglang-kt has no benchmark/serving.py
    assert {"--dataset-path", "--random-range-ratio", "--output-file"} <= report.bench.flags
    assert report.bench.version and "0.7.2" in report.bench.version  # sglang-kt 0.7.2 in .venv-bench


def _sim_space(**server_args: object):  # type: ignore[no-untyped-def]
    space = load_space(REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml")
    server = dataclasses.replace(space.server, args={**space.server.args, **server_args})
    return dataclasses.replace(space, server=server)


@requires_bench_client
def test_removed_server_flag_is_refused_in_one_line(shared_cache: HelpCache) -> None:
    space = _sim_space(**{"kt-amx-weight-path": "/x", "kt-cpuinfr": 8, "enable-p2p-check": False})
    with pytest.raises(ConfigError) as err:
        check_space_compat(space, cache=shared_cache)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("server: sglang-kt 0.7.2 (simulated) has no ")
    assert "--kt-amx-weight-path (from server.args.kt-amx-weight-path" in msg
    assert "--kt-cpuinfr (from server.args.kt-cpuinfr; did you mean --kt-cpuinfer)" in msg
    assert "enable-p2p-check" not in msg  # False is never passed


@requires_bench_client
def test_unknown_bench_flag_names_the_workload_and_the_client_version(shared_cache: HelpCache) -> None:
    space = _sim_space()
    w = dataclasses.replace(space.workloads[0], extra_args={"disable-ignore-eos": True, "warmup-requsts": 2})
    space = dataclasses.replace(space, workloads=(w, *space.workloads[1:]))
    with pytest.raises(ConfigError) as err:
        check_space_compat(space, cache=shared_cache)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("bench: sglang.bench_serving (sglang-kt 0.7.2, ")
    assert f"--warmup-requsts (from workloads.{w.name}.extra_args; did you mean --warmup-requests)" in msg
    assert "disable-ignore-eos" not in msg


def test_flag_inventory_covers_tuned_fixed_and_kttune_flags() -> None:
    space = _sim_space()
    flags = server_flags(space)
    assert flags["--kt-cpuinfer"] == "params.kt-cpuinfer" and flags["--kt-method"] == "server.args.kt-method"
    assert flags["--port"].startswith("kttune")
    w = Workload("x", 4, 8, 8, max_concurrency=2, extra_args={"flush-cache": True})
    space = dataclasses.replace(space, workloads=(w,))
    bench = bench_flags(space)
    assert bench["--flush-cache"] == "workloads.x.extra_args"
    assert bench["--max-concurrency"] == "kttune (workload x)" and "--output-file" in bench


FAKE_CLI = '''
import argparse, time, os
if os.environ.get("FAKE_CLI_SLEEP"):
    time.sleep(float(os.environ["FAKE_CLI_SLEEP"]))
p = argparse.ArgumentParser()
p.add_argument("--alpha")
p.add_argument("--beta", action="store_true")
p.parse_args()
'''


def test_help_is_cached_in_memory_and_on_disk_until_the_module_changes(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "fakepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text(FAKE_CLI)
    env = {"PYTHONPATH": str(tmp_path / "src")}
    cmd = [sys.executable, "-m", "fakepkg.cli"]
    cache = HelpCache(cache_dir=tmp_path / "cache")
    assert cache.get(cmd, env, where="server").flags == {"--help", "--alpha", "--beta"}
    cache.get(cmd, env, where="server")
    assert cache.runs == 1  # memory
    again = HelpCache(cache_dir=tmp_path / "cache")
    assert again.get(cmd, env, where="server").flags == {"--help", "--alpha", "--beta"}
    assert again.runs == 0  # disk
    (pkg / "cli.py").write_text(FAKE_CLI.replace('"--beta"', '"--gamma"'))
    later = time.time() + 5
    os.utime(pkg / "cli.py", (later, later))
    fresh = HelpCache(cache_dir=tmp_path / "cache")
    assert fresh.get(cmd, env, where="server").flags == {"--help", "--alpha", "--gamma"}
    assert fresh.runs == 1


def test_a_help_that_fails_or_hangs_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        HelpCache(cache_dir=None).get([sys.executable, "-m", "no_such_module_kttune"], where="server")
    assert "No module named no_such_module_kttune" in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("server: `")
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text(FAKE_CLI)
    env = {"PYTHONPATH": str(tmp_path), "FAKE_CLI_SLEEP": "5"}
    with pytest.raises(ConfigError) as err:
        HelpCache(cache_dir=None, timeout_s=1).get([sys.executable, "-m", "fakepkg.cli"], env, where="bench")
    assert "did not finish within 1 s" in str(err.value) and str(err.value).startswith("bench: ")
