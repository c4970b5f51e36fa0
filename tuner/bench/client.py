"""Run `sglang.bench_serving` as a subprocess and parse the JSON line it appends.

kttune never imports bench_serving: it runs under the configured interpreter (often another
venv), writes into a fresh per-trial output file, and the last JSON line is the result.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.bench.dialect import goodput_args
from tuner.bench.metrics import MetricKind, metric_kind
from tuner.config import BenchSpec, SloSpec, Workload
from tuner.errors import BenchmarkError, ConfigError
from tuner.server import decisive_line, die_with_tuner, flag_args

RESULT_SCHEMA_VERSION = 1
# How sglang refuses a request too long for the KV pool or the context, as the client logs the
# HTTP 400 body (python/sglang/srt/managers/utils.py validate_input_length and
# python/sglang/srt/managers/tokenizer_manager.py): the configuration's fault, not the client's.
REQUEST_TOO_LONG = re.compile(
    r"Input length \(\d+ tokens\) exceeds the maximum allowed length \(\d+ tokens\)"
    r"|is longer than the model's context length \(\d+ tokens\)"
    r"|Requested token count exceeds the model's maximum context length")


@dataclass(frozen=True)
class BenchResult:
    workload: str
    metrics: dict[str, float]
    output_file: Path
    wall_s: float
    completed: int
    requested: int
    schema_version: int = RESULT_SCHEMA_VERSION


def build_bench_argv(bench: BenchSpec, w: Workload, *, host: str, port: int, output_file: Path,
                     tokenizer: str | None, slos: Sequence[SloSpec] = ()) -> list[str]:
    """The client's argv for one workload. kttune always passes ``--seed`` (the clients'
    defaults differ: 1 in sglang-kt, 42 upstream) and, for a client that takes it, the SLOs'
    ``--goodput`` bounds."""
    if bench.module is None:
        raise ConfigError("bench.module: not found yet; resolve the space with tuner.bench.resolve_bench first")
    argv = [bench.python, "-m", bench.module, "--backend", bench.backend, "--host", host,
            "--port", str(port), "--dataset-name", w.dataset_name, "--num-prompts", str(w.num_prompts),
            "--random-input-len", str(w.input_len), "--random-output-len", str(w.output_len),
            "--random-range-ratio", str(w.range_ratio), "--seed", str(bench.seed),
            "--output-file", str(output_file)]
    if ":" in host:  # an IPv6 address: the client joins host and port without brackets, so give it the URL
        argv += ["--base-url", f"http://[{host}]:{port}"]
    if bench.dataset_path:
        argv += ["--dataset-path", bench.dataset_path]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    if bench.model:
        argv += ["--model", bench.model]
    if w.max_concurrency:
        argv += ["--max-concurrency", str(w.max_concurrency)]
    if w.request_rate:
        argv += ["--request-rate", str(w.request_rate)]
    return argv + goodput_args(bench, slos, w.name) + flag_args(w.extra_args)


def rescale_metrics(raw: Mapping[str, Any], time_scale: float) -> dict[str, float]:
    """Numeric metrics of one JSON line; with a time-scaled server, rates are multiplied by
    the scale and durations divided by it, so figures read in real-hardware units."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        v = float(value)
        if time_scale != 1.0:
            kind = metric_kind(key)
            if kind is MetricKind.RATE:
                v *= time_scale
            elif kind is MetricKind.TIME:
                v /= time_scale
        out[key] = v
    return out


def read_last_result(path: Path, *, lines_before: int = 0) -> dict[str, Any] | None:
    """The last JSON line appended after `lines_before` lines, or None if none was written."""
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    for line in reversed(lines[lines_before:]):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _tail(path: Path, n: int = 3) -> str:
    """The bench log's decisive line (the exception a traceback ends with), then its last lines."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = " | ".join(lines[-n:])[-400:]
    decisive = decisive_line(text)
    return tail if decisive is None else f"{decisive}\nlast lines of {path}: {tail}"


def run_workload(bench: BenchSpec, w: Workload, *, host: str, port: int, trial_dir: Path,
                 tokenizer: str | None, server_alive: Callable[[], bool] | None = None,
                 poll_s: float = 0.5, env: Mapping[str, str] | None = None,
                 slos: Sequence[SloSpec] = ()) -> BenchResult:
    """Run one workload; raise BenchmarkError(reason=...) when no usable line is written.
    `env` is layered over the bench's own (e.g. the server's API key for the client)."""
    output_file = trial_dir / f"bench-{w.name}.jsonl"
    log_file = trial_dir / f"bench-{w.name}.log"
    before = len([ln for ln in output_file.read_text().splitlines() if ln.strip()]) if output_file.exists() else 0
    argv = build_bench_argv(bench, w, host=host, port=port, output_file=output_file, tokenizer=tokenizer, slos=slos)
    (trial_dir / f"bench-{w.name}.argv.json").write_text(json.dumps(argv, indent=1))
    child_env = {**os.environ, **bench.env, **(env or {})}
    started = time.monotonic()
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(die_with_tuner(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, start_new_session=True)
        try:
            reason = _watch(proc, bench.timeout_s, server_alive, poll_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - started
    if reason == "server_died":
        raise BenchmarkError(f"server died during workload {w.name}: {_tail(log_file)}", reason="server_died")
    if reason == "bench_timeout":
        raise BenchmarkError(f"workload {w.name} ran past bench.timeout_s={bench.timeout_s:g}", reason="bench_timeout")
    raw = read_last_result(output_file, lines_before=before)
    completed = int(raw.get("completed", 0) or 0) if raw is not None else 0
    refused = request_refusal(log_file) if completed < w.num_prompts else None
    if refused is not None:
        raise BenchmarkError(f"the server refused workload {w.name}'s requests as too long: {refused}",
                             reason="request_too_long")
    if raw is None:
        raise BenchmarkError(f"bench_serving wrote no result for {w.name} (rc={proc.returncode}): {_tail(log_file)}",
                             reason="bench_no_result")
    metrics = rescale_metrics(raw, bench.time_scale)
    result = BenchResult(workload=w.name, metrics=metrics, output_file=output_file, wall_s=wall,
                         completed=completed, requested=w.num_prompts)
    if completed < w.num_prompts:
        raise BenchmarkError(f"workload {w.name} completed {completed} of {w.num_prompts} requests",
                             reason="bench_incomplete")
    return result


def request_refusal(log_file: Path) -> str | None:
    """The server's words when the bench log shows a request refused as too long, else None."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return None
    m = REQUEST_TOO_LONG.search(text)
    if m is None:
        return None
    line_start = text.rfind("\n", 0, m.start()) + 1
    line_end = text.find("\n", m.end())
    line = text[line_start:line_end if line_end >= 0 else len(text)].strip()
    return line[-400:]


def _watch(proc: subprocess.Popen[bytes], timeout_s: float, server_alive: Callable[[], bool] | None,
           poll_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return "bench_timeout"
        if server_alive is not None and not server_alive():
            # Give the client a moment to write its line for what already finished.
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            return "server_died"
        time.sleep(poll_s)
    return None
