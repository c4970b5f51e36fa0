"""The sets of tuner/config/sglang.py, read again from the installed sglang-kt: the bench
client's result keys and dataset choices, and the server's int flags. A newer sglang-kt that
adds or renames one fails here, not in a user's study."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, bench_python, requires_bench_client
from tuner.config.sglang import BENCH_DATASETS, BENCH_METRICS, INT_FLAGS, SOURCE_VERSION

# The keys of bench_serving's result dict that echo its arguments, not measurements.
ARGUMENT_ECHO = {"tag", "backend", "dataset_name", "request_rate", "max_concurrency", "sharegpt_output_len",
                 "random_input_len", "random_output_len", "random_range_ratio", "server_info"}


def _sglang_source(relative: str) -> str:
    python = bench_python()
    if python is None:
        pytest.skip("bench client venv missing: run scripts/setup.sh")
    out = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('sglang').origin)"],
                         capture_output=True, text=True, timeout=60, check=True)
    return (Path(out.stdout.strip()).parent / relative).read_text()


@requires_bench_client
def test_the_installed_client_is_the_version_the_sets_were_read_from() -> None:
    python = bench_python()
    assert python is not None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('sglang-kt'))"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert SOURCE_VERSION == f"sglang-kt {out.stdout.strip()}"


@requires_bench_client
def test_bench_metrics_are_the_measured_keys_of_the_result_line() -> None:
    tree = ast.parse(_sglang_source("bench_serving.py"))
    dicts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
             and any(isinstance(t, ast.Name) and t.id == "result" for t in n.targets)]
    assert len(dicts) == 1
    keys = {k.value for k in dicts[0].keys if isinstance(k, ast.Constant)}
    assert ARGUMENT_ECHO <= keys
    assert keys - ARGUMENT_ECHO == BENCH_METRICS


@requires_bench_client
def test_bench_datasets_are_the_parsers_choices() -> None:
    python = bench_python()
    assert python is not None
    help_text = subprocess.run([str(python), "-m", "sglang.bench_serving", "--help"], capture_output=True, text=True,
                               timeout=120, cwd=REPO).stdout
    choices = help_text.split("--dataset-name {", 1)[1].split("}", 1)[0].split(",")
    assert tuple(choices) == BENCH_DATASETS


@requires_bench_client
def test_int_flags_are_the_servers_type_int_options() -> None:
    tree = ast.parse(_sglang_source("srt/server_args.py"))
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"):
            continue
        kind = {k.arg: k.value for k in node.keywords}.get("type")
        if isinstance(kind, ast.Name) and kind.id == "int":
            found |= {a.value[2:] for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    assert found == INT_FLAGS
