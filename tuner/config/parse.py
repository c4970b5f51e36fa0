"""Search-space files: read the YAML, validate every section and build the `SearchSpace`.

A space is data (YAML). This module is the one seam where it becomes typed objects; a fault
raises ConfigError naming the field and how to fix it.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tuner.config.fields import (
    check_dataset,
    check_keys,
    env_mapping,
    fail,
    flag_name,
    mapping,
    number,
    relative_note,
    resolve_python,
)
from tuner.config.quality import QualitySpec
from tuner.config.sglang import BENCH_DATASETS, BENCH_METRICS, INT_FLAGS, SOURCE_VERSION
from tuner.config.specs import (
    ACCURACY_FLAGS,
    DEFAULT_SECRETS,
    ENV_PREFIX,
    BenchSpec,
    ConfirmSpec,
    FeasibilitySpec,
    ObjectiveSpec,
    ParamSpec,
    ProbeSpec,
    SearchSpace,
    ServerSpec,
    SloSpec,
    Workload,
    is_finite,
)

DEFAULT_WORKLOADS: dict[str, dict[str, Any]] = {
    "prefill": {"num_prompts": 37, "input_len": 1024, "output_len": 1},
    "decode": {"num_prompts": 37, "input_len": 10, "output_len": 512},
}
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
DEFAULT_OBJECTIVE = [{"workload": "decode", "metric": "output_throughput", "direction": "maximize"}]


# ---------------------------------------------------------------- sections


def _param_name(key: Any, fixed_env: Mapping[str, str]) -> str:
    """A launch flag, or ``env:NAME`` for a tuned environment variable of the server."""
    if isinstance(key, str) and key.startswith(ENV_PREFIX):
        name = key[len(ENV_PREFIX):]
        if not _ENV_NAME.fullmatch(name):
            raise fail(f"params.{key}", f"bad environment variable name {name!r}",
                       "write env:NAME with NAME in capitals, digits and underscores (e.g. env:KT_RAWINT4_BACKEND)")
        if name in fixed_env:
            raise fail(f"params.{key}", "is also fixed in server.env", "tune it or fix it, not both")
        return key
    return flag_name("params", key)


def _parse_param(where: str, flag: str, spec: Any) -> ParamSpec:
    spec = mapping(where, spec)
    check_keys(where, spec, {"low", "high", "step", "log", "choices", "type"})
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(f"{where}.choices", "must be a non-empty list", "list at least one value")
        for c in choices:
            if not isinstance(c, (int, float, str, bool)) or c is None:
                raise fail(f"{where}.choices", f"bad choice {c!r}", "use numbers, strings or booleans")
        if len(set(map(repr, choices))) != len(choices):
            raise fail(f"{where}.choices", "has duplicates", "list each value once")
        if set(spec) - {"choices"}:
            raise fail(where, "choices cannot be combined with low/high/step/log", "use either choices or a range")
        fractional = [c for c in choices if isinstance(c, float)]
        if flag in INT_FLAGS and fractional:  # the server's int() refuses "--x 2.0" as well
            raise fail(f"{where}.choices", f"{fractional[0]!r} for a whole-number flag (sglang parses {flag} as an int)",
                       "list whole numbers without a decimal point")
        return ParamSpec(flag=flag, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise fail(where, "needs either choices or low and high", "add low: and high:")
    kind = spec.get("type")
    if kind not in (None, "int", "float"):
        raise fail(f"{where}.type", f"unknown type {kind!r}", "use int or float")
    floats = [k for k in ("low", "high", "step") if isinstance(spec.get(k), float)]
    if flag in INT_FLAGS and (kind == "float" or floats):
        # A float range proposes values like 23.7, which the server refuses at launch.
        key = "type" if kind == "float" else floats[0]
        raise fail(f"{where}.{key}", f"{spec[key]!r} for a whole-number flag (sglang parses {flag} as an int)",
                   "write whole-number bounds (e.g. low: 8) without type: float")
    if kind == "int" and floats:
        raise fail(f"{where}.{floats[0]}", f"{spec[floats[0]]!r} is not a whole number and the type is int",
                   "write whole-number bounds or set type: float")
    is_float = kind == "float" or bool(floats)
    low = number(f"{where}.low", spec["low"], integer=not is_float)
    high = number(f"{where}.high", spec["high"], integer=not is_float)
    if low > high:
        raise fail(where, f"empty range low={low} > high={high}", "make low ≤ high")
    step = spec.get("step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{where}.log", f"must be true or false, got {log!r}", "set true or false")
    if step is not None:
        step = number(f"{where}.step", step, integer=not is_float, positive=True)
        if log:
            raise fail(where, "step and log cannot be combined", "drop one of them")
        if not is_float and (high - low) % step != 0:
            raise fail(where, f"high - low ({high - low}) is not a multiple of step {step}", f"set high to {low + (high - low) // step * step}")
    if log and low <= 0:
        raise fail(f"{where}.low", f"must be > 0 with log: true, got {low}", "raise low or drop log")
    return ParamSpec(flag=flag, low=low, high=high, step=step, log=log, is_float=is_float)


def _parse_server(data: Mapping[str, Any], base: Path, check: bool) -> ServerSpec:
    where = "server"
    check_keys(where, data, {"python", "module", "command", "host", "port", "start_timeout_s", "stall_timeout_s", "env",
                           "args"})
    command = data.get("command")
    if command is not None:
        if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
            raise fail(f"{where}.command", "must be a non-empty list of strings", "e.g. [/opt/sglang/bin/python, -m, sglang.launch_server]")
        if "module" in data:
            raise fail(where, "module and command are exclusive", "keep one of them")
    module = data.get("module", "sglang.launch_server") if command is None else None
    if module is not None and (not isinstance(module, str) or not module):
        raise fail(f"{where}.module", f"must be a module name, got {module!r}", "e.g. sglang.launch_server")
    host = data.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise fail(f"{where}.host", f"must be a host address, got {host!r}", "use 127.0.0.1")
    port = data.get("port")
    if port is not None:
        port = int(number(f"{where}.port", port, integer=True, positive=True))
        if port > 65535:
            raise fail(f"{where}.port", f"{port} is not a TCP port", "use 1024-65535 or remove it for a fresh free port per trial")
    timeout = number(f"{where}.start_timeout_s", data.get("start_timeout_s", 1800), positive=True)
    stall = number(f"{where}.stall_timeout_s", data.get("stall_timeout_s", 600), positive=True)
    env = env_mapping(f"{where}.env", data.get("env"))
    args: dict[str, Any] = {}
    for key, value in mapping(f"{where}.args", data.get("args")).items():
        flag = flag_name(f"{where}.args", key)
        if value is None:
            raise fail(f"{where}.args.{flag}", "has no value", "give it a value, or true for a switch")
        args[flag] = value
    python = resolve_python(f"{where}.python", data.get("python"), base, check)
    return ServerSpec(python=python, module=module, command=tuple(command) if command else None,
                      host=host, port=port, start_timeout_s=float(timeout), env=env, args=args,
                      stall_timeout_s=float(stall))


def _parse_workloads(data: Any) -> tuple[Workload, ...]:
    raw = DEFAULT_WORKLOADS if data is None else mapping("workloads", data)
    if not raw:
        raise fail("workloads", "is empty", "define at least one workload or remove the key for the defaults")
    allowed = {"num_prompts", "input_len", "output_len", "range_ratio", "dataset_name", "max_concurrency", "request_rate", "extra_args"}
    out = []
    for name, spec in raw.items():
        where = f"workloads.{name}"
        spec = mapping(where, spec)
        check_keys(where, spec, allowed, {"num_prompts", "input_len", "output_len"})
        nums = {k: int(number(f"{where}.{k}", spec[k], integer=True, positive=True)) for k in ("num_prompts", "input_len", "output_len")}
        ratio = number(f"{where}.range_ratio", spec.get("range_ratio", 1.0))
        if not 0.0 <= ratio <= 1.0:
            raise fail(f"{where}.range_ratio", f"must be within [0, 1], got {ratio}", "use 1.0 for fixed lengths")
        conc = spec.get("max_concurrency")
        if conc is not None:
            conc = int(number(f"{where}.max_concurrency", conc, integer=True, positive=True))
        rate = spec.get("request_rate")
        if rate is not None:
            rate = float(number(f"{where}.request_rate", rate, positive=True))
        dataset = spec.get("dataset_name", "random")
        if dataset not in BENCH_DATASETS:
            raise fail(f"{where}.dataset_name", f"{dataset!r} is not a dataset bench_serving knows ({SOURCE_VERSION})",
                       f"use one of: {', '.join(BENCH_DATASETS)}")
        extra = dict(mapping(f"{where}.extra_args", spec.get("extra_args")))
        for key in extra:
            flag_name(f"{where}.extra_args", key)
        out.append(Workload(name=str(name), range_ratio=float(ratio), dataset_name=str(dataset),
                            max_concurrency=conc, request_rate=rate, extra_args=extra, **nums))
    return tuple(out)


def _parse_objectives(data: Any, workloads: tuple[Workload, ...]) -> tuple[ObjectiveSpec, ...]:
    raw = DEFAULT_OBJECTIVE if data is None else data
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise fail("objective", "must be a list of {workload, metric, direction}", "e.g. [{workload: decode, metric: output_throughput}]")
    names = {w.name for w in workloads}
    out = []
    for i, spec in enumerate(raw):
        where = f"objective[{i}]"
        spec = mapping(where, spec)
        check_keys(where, spec, {"workload", "metric", "direction"}, {"workload", "metric"})
        if spec["workload"] not in names:
            raise fail(f"{where}.workload", f"unknown workload {spec['workload']!r}", f"use one of: {', '.join(sorted(names))}")
        _check_metric(f"{where}.metric", spec["metric"])
        direction = spec.get("direction", "maximize")
        if direction not in ("maximize", "minimize"):
            raise fail(f"{where}.direction", f"must be maximize or minimize, got {direction!r}", "fix the spelling")
        out.append(ObjectiveSpec(workload=str(spec["workload"]), metric=str(spec["metric"]), direction=direction))
    if len({o.key for o in out}) != len(out):
        raise fail("objective", "lists the same metric twice", "remove the duplicate")
    return tuple(out)


def _check_metric(where: str, metric: Any) -> None:
    """A metric the bench client reports; any other would fail every launch as metric_missing."""
    if metric in BENCH_METRICS:
        return
    close = difflib.get_close_matches(str(metric), BENCH_METRICS, n=3)
    fix = f"did you mean {' or '.join(close)}?" if close else f"use one of: {', '.join(sorted(BENCH_METRICS))}"
    raise fail(where, f"{metric!r} is not a metric bench_serving reports ({SOURCE_VERSION})", fix)


_SLO_OPS = {"<=": "max", "<": "max", ">=": "min", ">": "min"}


def _parse_slos(data: Any, workloads: tuple[Workload, ...]) -> tuple[SloSpec, ...]:
    """`slo:` is a list of {workload, metric, max|min} or strings like
    "decode.p99_ttft_ms <= 5000"."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise fail("slo", "must be a list", "e.g. [{workload: decode, metric: p99_ttft_ms, max: 5000}]")
    names = {w.name for w in workloads}
    out = []
    for i, item in enumerate(data):
        where = f"slo[{i}]"
        if isinstance(item, str):
            parts = item.split()
            if len(parts) != 3 or parts[1] not in _SLO_OPS or "." not in parts[0]:
                raise fail(where, f"cannot read {item!r}", "write it as 'workload.metric <= number'")
            wl, _, metric = parts[0].partition(".")
            try:
                bound = float(parts[2])
            except ValueError:
                raise fail(where, f"bound {parts[2]!r} is not a number", "use a number") from None
            number(where, bound, positive=True)  # a latency or a rate: a bound ≤ 0 never or always holds
            item = {"workload": wl, "metric": metric, _SLO_OPS[parts[1]]: bound}
        item = mapping(where, item)
        check_keys(where, item, {"workload", "metric", "max", "min"}, {"workload", "metric"})
        if item["workload"] not in names:
            raise fail(f"{where}.workload", f"unknown workload {item['workload']!r}", f"use one of: {', '.join(sorted(names))}")
        _check_metric(f"{where}.metric", item["metric"])
        if ("max" in item) == ("min" in item):
            raise fail(where, "needs exactly one of max or min", "e.g. max: 5000")
        bound_key = "max" if "max" in item else "min"
        bound = number(f"{where}.{bound_key}", item[bound_key], positive=True)
        out.append(SloSpec(workload=str(item["workload"]), metric=str(item["metric"]), **{bound_key: float(bound)}))
    return tuple(out)


# A Hugging Face repository id ("org/name" or "name"); anything else (absolute, ./, ~, deeper
# paths) names a local path, which must exist.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _parse_bench(data: Mapping[str, Any], base: Path, check: bool) -> BenchSpec:
    where = "bench"
    check_keys(where, data, {"python", "module", "backend", "dataset_path", "tokenizer", "model", "timeout_s", "seed", "env", "time_scale"})

    def local_path(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise fail(f"{where}.{key}", f"must be a path, got {value!r}", "set a local path")
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else base / path
        if check and key == "dataset_path":
            check_dataset(f"{where}.{key}", path, relative_note(value, base))
        if check and key == "tokenizer" and path.is_file():
            raise fail(f"{where}.{key}", f"{path} is a file", "point it at the tokenizer's folder (or the model's)")
        if key == "tokenizer" and not path.exists():
            if check and not _HUB_ID.match(value):
                raise fail(f"{where}.{key}", f"{path} does not exist{relative_note(value, base)}",
                           "point it at the tokenizer's local folder, or give a Hugging Face id such as org/name")
            return value  # a hub id; bench_serving resolves it
        return str(path)

    time_scale = number(f"{where}.time_scale", data.get("time_scale", 1.0), positive=True)
    return BenchSpec(
        python=resolve_python(f"{where}.python", data.get("python"), base, check),
        module=_bench_module(data.get("module")),
        backend=str(data.get("backend", "sglang")),
        dataset_path=local_path("dataset_path"),
        tokenizer=local_path("tokenizer"),
        model=data.get("model"),
        timeout_s=float(number(f"{where}.timeout_s", data.get("timeout_s", 3600), positive=True)),
        seed=int(number(f"{where}.seed", data.get("seed", 1), integer=True)),
        env=env_mapping(f"{where}.env", data.get("env")),
        time_scale=float(time_scale),
    )


def _bench_module(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or " " in value:
        raise fail("bench.module", f"must be a module name, got {value!r}",
                   "e.g. sglang.benchmark.serving (upstream) or sglang.bench_serving (sglang-kt); leave it out to find it")
    return value


def _check_value_in(where: str, spec: ParamSpec, value: Any) -> None:
    if spec.choices is not None:
        if value not in spec.choices:
            raise fail(where, f"{value!r} is not one of the choices {list(spec.choices)}", "add it to the choices or change it")
        return
    number(where, value, integer=not spec.is_float)
    assert spec.low is not None and spec.high is not None
    if not spec.low <= value <= spec.high:
        raise fail(where, f"{value} is outside [{spec.low}, {spec.high}]", "widen the range or change the value")
    if spec.step and not spec.is_float and (value - spec.low) % spec.step != 0:
        raise fail(where, f"{value} is not on the grid low + k·{spec.step}", "change the value or the step")


def _resolve_model_paths(args: dict[str, Any], base: Path) -> None:
    for key in ("model-path", "model", "kt-weight-path", "tokenizer-path"):
        value = args.get(key)
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)) and (base / value).exists():
            args[key] = str((base / value).resolve())


def parse_space(data: Any, *, path: Path | None = None, check_paths: bool = True, base: Path | None = None) -> SearchSpace:
    """Validate a loaded YAML document. Raises ConfigError naming the field. Relative paths in
    it are read from `base`, the current directory by default (see docs/search-space.md)."""
    base = base or Path.cwd()
    data = mapping("space", data)
    check_keys("space", data, {"name", "description", "server", "params", "workloads", "objective", "bench", "baseline", "hardware", "model", "slo", "quality", "confirm", "probe", "feasibility", "secret"}, {"server", "params"})
    server = _parse_server(mapping("server", data["server"]), base, check_paths)
    args = dict(server.args)
    _resolve_model_paths(args, base)
    model_path = args.get("model-path", args.get("model"))
    if model_path is None:
        raise fail("server.args.model-path", "missing", "set the model directory (the one with config.json)")
    if check_paths and not Path(os.path.expanduser(str(model_path))).is_dir():
        what = "is a file" if Path(os.path.expanduser(str(model_path))).exists() else "does not exist"
        raise fail("server.args.model-path", f"{model_path} {what}{relative_note(str(model_path), base)}",
                   "point it at the local model directory (the one with config.json)")
    location = args.get("init-expert-location")  # a path, inline JSON or sglang's "trivial"
    if (check_paths and isinstance(location, str) and location != "trivial" and not location.lstrip().startswith("{")
            and not Path(os.path.expanduser(location)).is_file()):
        raise fail("server.args.init-expert-location", f"{location} is not a file{relative_note(location, base)}",
                   "point it at an expert-location JSON file, or remove it")
    server = ServerSpec(**{**server.__dict__, "args": args})
    params_raw = mapping("params", data["params"])
    if not params_raw:
        raise fail("params", "is empty", "tune at least one flag, e.g. kt-num-gpu-experts: {low: 0, high: 200}")
    params = tuple(_parse_param(f"params.{_param_name(k, server.env)}", k, v) for k, v in params_raw.items())
    secrets = _parse_secrets(data.get("secret", list(DEFAULT_SECRETS)))
    for p in params:
        if p.flag in secrets:  # a tuned value is stored as a trial param, in plain text
            raise fail(f"params.{p.flag}", "is a secret (see secret:) and cannot be tuned", "set it in server.args")
        if p.flag in server.args:  # which one the launch uses would be a silent choice
            raise fail(f"server.args.{p.flag}", "is also tuned in params", "remove it from server.args or from params")
    workloads = _parse_workloads(data.get("workloads"))
    objectives = _parse_objectives(data.get("objective"), workloads)
    bench = _parse_bench(mapping("bench", data.get("bench")), base, check_paths)
    baseline = data.get("baseline")
    if baseline is not None:
        baseline = dict(mapping("baseline", baseline))
        by_flag = {p.flag: p for p in params}
        for key, value in baseline.items():
            if key not in by_flag:
                raise fail(f"baseline.{key}", "is not a tuned param", f"use one of: {', '.join(by_flag)}")
            _check_value_in(f"baseline.{key}", by_flag[key], value)
        missing = set(by_flag) - set(baseline)
        if missing:
            raise fail("baseline", f"lacks {', '.join(sorted(missing))}", "give every tuned param a value")
    quality = QualitySpec.from_space(SimpleNamespace(quality=dict(mapping("quality", data.get("quality")))))
    for p in params:
        if p.flag in ACCURACY_FLAGS and not (quality.enabled and quality.check_logprobs):
            raise fail(f"params.{p.flag}", "changes the model's outputs, and the quality check that would catch a "
                       "loss is off", "turn on quality.enabled and quality.check_logprobs, or fix it in server.args")
    name = data.get("name") or (path.stem if path else "space")
    if not isinstance(name, str):
        raise fail("name", f"must be a string, got {name!r}", "quote it")
    space = SearchSpace(name=name, path=path, server=server, params=params, workloads=workloads,
                       objectives=objectives, bench=bench, baseline=baseline, quality=quality,
                       hardware=dict(mapping("hardware", data.get("hardware"))),
                       model=dict(mapping("model", data.get("model"))),
                       slos=_parse_slos(data.get("slo"), workloads),
                       confirm=_parse_confirm(mapping("confirm", data.get("confirm"))),
                       probe=_parse_probe(mapping("probe", data.get("probe"))),
                       feasibility=_parse_feasibility(mapping("feasibility", data.get("feasibility"))),
                       secrets=secrets, document=dict(data), base=base)
    if bad := space.unknown_param_ref():
        raise fail(f"server.args.{bad[0]}", f"{{{bad[1]}}} names no flag of the space", "e.g. /w/pools{kt-threadpool-count}")
    return space


def _parse_secrets(data: Any) -> tuple[str, ...]:
    if not isinstance(data, list):
        raise fail("secret", f"must be a list of flag names, got {data!r}", "e.g. secret: [api-key, admin-api-key]")
    return tuple(flag_name("secret", flag) for flag in data)


def _parse_confirm(data: Mapping[str, Any]) -> ConfirmSpec:
    check_keys("confirm", data, {"runs", "finalists", "noise", "recheck"})
    runs, finalists = data.get("runs"), data.get("finalists", 2)
    noise, recheck = data.get("noise", ConfirmSpec.noise), data.get("recheck", ConfirmSpec.recheck)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 < noise < 1:
        raise fail("confirm.noise", f"must be a relative spread between 0 and 1, got {noise!r}", "e.g. confirm: {noise: 0.03}")
    if not isinstance(recheck, bool):
        raise fail("confirm.recheck", f"must be true or false, got {recheck!r}", "e.g. confirm: {recheck: true}")
    if runs is not None and (not isinstance(runs, int) or isinstance(runs, bool) or runs < 0):
        raise fail("confirm.runs", f"must be a whole number ≥ 0, got {runs!r}", "e.g. confirm: {runs: 2}")
    if not isinstance(finalists, int) or isinstance(finalists, bool) or finalists < 1:
        raise fail("confirm.finalists", f"must be a whole number ≥ 1, got {finalists!r}", "e.g. confirm: {finalists: 2}")
    return ConfirmSpec(runs=runs, finalists=finalists, noise=float(noise), recheck=recheck)


def _parse_feasibility(data: Mapping[str, Any]) -> FeasibilitySpec:
    check_keys("feasibility", data, {"boundary_failures"})
    n = data.get("boundary_failures", FeasibilitySpec.boundary_failures)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise fail("feasibility.boundary_failures", f"must be a whole number ≥ 0, got {n!r}",
                    "e.g. feasibility: {boundary_failures: 1}; 0 never launches inside the safety margin")
    return FeasibilitySpec(boundary_failures=n)


def _parse_probe(data: Mapping[str, Any]) -> ProbeSpec:
    check_keys("probe", data, {"fraction", "prune_below", "min_trials"})
    spec = ProbeSpec()
    fraction = data.get("fraction", spec.fraction)
    below = data.get("prune_below", spec.prune_below)
    min_trials = data.get("min_trials", spec.min_trials)
    if not is_finite(fraction) or not 0 <= fraction < 1:
        raise fail("probe.fraction", f"must be in [0, 1), got {fraction!r}", "e.g. 0.25; 0 turns the probe off")
    if not is_finite(below) or not 0 < below <= 1:
        raise fail("probe.prune_below", f"must be in (0, 1], got {below!r}", "e.g. 0.8: prune below 80 % of the best probe")
    if not isinstance(min_trials, int) or isinstance(min_trials, bool) or min_trials < 1:
        raise fail("probe.min_trials", f"must be a whole number ≥ 1, got {min_trials!r}", "e.g. 2")
    return ProbeSpec(fraction=float(fraction), prune_below=float(below), min_trials=min_trials)
