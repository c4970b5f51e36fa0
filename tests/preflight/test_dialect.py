"""Dialect detection, flags from the server's own parser, and profiles read by that parser: against
the real simulator (both dialects), the real sglang-kt install of .venv-bench and, where
scripts/upstream-venv.sh made it, upstream sglang 0.5.23's real parser."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import REPO, bench_python, requires_bench_client
from tuner.config import ParamSpec, load_space
from tuner.errors import ConfigError
from tuner.preflight import ParserCache, check_profile, check_space_compat, detect_dialect, server_options
from tuner.sim.args import UPSTREAM_LACKS

UPSTREAM = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090-upstream.yaml"
KT = REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml"
UPSTREAM_VENV = REPO / ".cache" / "upstream-venv" / "bin" / "python"


def with_args(path: Path, **args: object):  # type: ignore[no-untyped-def]
    space = load_space(path)
    return dataclasses.replace(space, server=dataclasses.replace(space.server, args={**space.server.args, **args}))


def test_the_simulator_answers_its_parser_per_dialect() -> None:
    cache = ParserCache(cache_dir=None)
    kt_dialect, kt_opts, _ = server_options(load_space(KT), parsers=cache)
    up_dialect, up_opts, _ = server_options(load_space(UPSTREAM), parsers=cache)
    assert (kt_dialect.name, kt_dialect.version, up_dialect.name, up_dialect.version) == ("sglang-kt", "0.7.2", "upstream", "0.5.23")
    assert kt_opts is not None and up_opts is not None
    assert set(UPSTREAM_LACKS) <= kt_opts.flags and not set(UPSTREAM_LACKS) & up_opts.flags
    assert "--paged-experts-num-resident" in up_opts.flags - kt_opts.flags
    assert kt_opts.by_flag["--kt-expert-placement-strategy"]["choices"] == ["frequency", "front-loading", "uniform", "random"]
    server_options(load_space(KT), parsers=cache)
    assert cache.runs == 2  # the same interpreter and dialect again: from memory


@requires_bench_client
def test_a_flag_the_dialect_lacks_and_a_value_outside_its_choices_are_one_line_errors() -> None:
    with pytest.raises(ConfigError) as err:
        check_space_compat(with_args(UPSTREAM, **{"kt-gpu-prefill-token-threshold": 4096}))
    assert str(err.value).startswith("server: upstream sglang 0.5.23 (simulated) has no --kt-gpu-prefill-token-threshold")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^server.args.attention-backend: 'nope' is not one of its choices"):
        check_space_compat(with_args(KT, **{"attention-backend": "nope"}))
    space = load_space(KT)
    space = dataclasses.replace(space, params=(*space.params, ParamSpec("kt-expert-placement-strategy",
                                                                        choices=("uniform", "hottest"))))
    with pytest.raises(ConfigError, match=r"^params.kt-expert-placement-strategy: 'hottest' is not one of its choices"):
        check_space_compat(space)
    with pytest.raises(ConfigError, match=r"^server.args.kt-cpuinfer: takes an int, got 'many'"):
        check_space_compat(with_args(KT, **{"kt-cpuinfer": "many"}))


@requires_bench_client
def test_a_real_sglang_kt_install_is_detected_from_metadata_without_importing_it() -> None:
    space = load_space(KT)
    server = dataclasses.replace(space.server, python=str(bench_python()), module="sglang.launch_server", command=None)
    space = dataclasses.replace(space, server=server)
    dialect = detect_dialect(space)
    assert (dialect.name, dialect.package, dialect.version) == ("sglang-kt", "sglang-kt", "0.7.2")
    assert dialect.server_info_endpoint == "/server_info" and not dialect.simulated
    # Its parser needs torch, which the bench venv lacks: no options, and the reason (the --help fallback takes over).
    _, opts, why = server_options(space, parsers=ParserCache(cache_dir=None))
    assert opts is None and "ModuleNotFoundError" in why


def test_a_profile_is_read_by_the_dialects_parser(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model-path: /m\nkt-num-gpu-experts: 8\nenable-mixed-chunk: true\n")
    bad.write_text("model-path: /m\nkt-gpu-experts-ratio: 0.5\n")
    assert "--config merger" in str(check_profile(load_space(UPSTREAM), good).checked_by)
    assert check_profile(load_space(KT), bad).checked_by  # sglang-kt has the ratio
    with pytest.raises(ConfigError, match=r"^export: upstream sglang 0.5.23 \(simulated\) refuses profile key 'kt-gpu-experts-ratio'"):
        check_profile(load_space(UPSTREAM), bad)


@pytest.mark.skipif(not UPSTREAM_VENV.exists(), reason="no upstream venv: run scripts/upstream-venv.sh (a CPU torch, ~1 GB)")
def test_upstream_sglangs_own_parser(tmp_path: Path) -> None:
    space = load_space(UPSTREAM)
    server = dataclasses.replace(space.server, python=str(UPSTREAM_VENV), module="sglang.launch_server", command=None,
                                 args={k: v for k, v in space.server.args.items() if not k.startswith("sim-")})
    space = dataclasses.replace(space, server=server)
    dialect, opts, why = server_options(space, parsers=ParserCache(cache_dir=tmp_path))
    assert (dialect.name, dialect.version) == ("upstream", "0.5.23") and opts is not None, why
    assert {f for f in opts.flags if f.startswith("--kt-")} == {"--kt-weight-path", "--kt-method", "--kt-cpuinfer",
                                                                 "--kt-threadpool-count", "--kt-num-gpu-experts",
                                                                 "--kt-max-deferred-experts-per-token"}
    assert ParserCache(cache_dir=tmp_path).options(space, dialect)[0] == opts  # from the disk cache
    bad = tmp_path / "bad.yaml"
    bad.write_text("model-path: /m\nkt-expert-placement-strategy: frequency\n")
    with pytest.raises(ConfigError, match="refuses profile key 'kt-expert-placement-strategy'"):
        check_profile(space, bad, dialect=dialect)
