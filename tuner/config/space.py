"""Search-space files: load, validate, and convert to Optuna distributions.

A space is data (YAML). This module is the one seam where it becomes typed objects and
Optuna distributions; everything downstream works on `SearchSpace`.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import yaml

from tuner.errors import ConfigError
from tuner.trial.quality import QualitySpec

Scalar = int | float | str | bool

DEFAULT_WORKLOADS: dict[str, dict[str, Any]] = {
    "prefill": {"num_prompts": 37, "input_len": 1024, "output_len": 1},
    "decode": {"num_prompts": 37, "input_len": 10, "output_len": 512},
}
DEFAULT_OBJECTIVE = [{"workload": "decode", "metric": "output_throughput", "direction": "maximize"}]
# kttune sets these per trial; a space must not fix or tune them.
RESERVED_FLAGS = frozenset({"host", "port"})
AUTO = "auto"


#: Flags whose throughput rises until GPU memory runs out: searched from their fitting boundary.
CAPACITY_FLAGS = ("kt-num-gpu-experts",)


@dataclass(frozen=True)
class ParamSpec:
    """One tuned launch flag: an int/float range or a list of choices."""

    flag: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Scalar, ...] | None = None
    is_float: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        assert self.low is not None and self.high is not None
        if self.is_float:
            return optuna.distributions.FloatDistribution(
                self.low, self.high, log=self.log, step=self.step
            )
        return optuna.distributions.IntDistribution(
            int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
        )


@dataclass(frozen=True)
class ServerSpec:
    python: str
    module: str | None
    command: tuple[str, ...] | None
    host: str
    port: int | None
    start_timeout_s: float
    env: Mapping[str, str]
    args: Mapping[str, Any]

    def launcher(self) -> list[str]:
        """The argv prefix that starts the server (before any flag)."""
        if self.command:
            return list(self.command)
        return [self.python, "-m", str(self.module)]


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float = 1.0
    dataset_name: str = "random"
    max_concurrency: int | None = None
    request_rate: float | None = None
    extra_args: Mapping[str, Any] = field(default_factory=dict)

    def tokens_per_request(self) -> int:
        return self.input_len + self.output_len


@dataclass(frozen=True)
class BenchSpec:
    python: str
    module: str
    backend: str
    dataset_path: str | None
    tokenizer: str | None
    model: str | None
    timeout_s: float
    seed: int
    env: Mapping[str, str]
    # Only for a time-scaled simulated server: measured durations are divided by this
    # factor (throughputs multiplied) so metrics read in real-hardware units.
    time_scale: float = 1.0


@dataclass(frozen=True)
class ConfirmSpec:
    """Confirmation launches at the end of the budget: `runs` re-measurements of
    the `finalists` best configurations; runs None = 2 when the budget is ≥ 10, else 0."""

    runs: int | None = None
    finalists: int = 2
    noise: float = 0.03  # prior run-to-run relative spread (sd), until repeats measure it
    recheck: bool = True  # re-measure a new leader once when it leads by less than the noise

    def runs_for(self, budget: int) -> int:
        runs = (2 if budget >= 10 else 0) if self.runs is None else self.runs
        return max(0, min(runs, budget - 1))


@dataclass(frozen=True)
class FeasibilitySpec:
    """How close to the predicted memory limit kttune may launch. A configuration predicted to
    fit only inside the safety margin (anchored on launched servers' logs) may be launched while
    fewer than `boundary_failures` such launches failed; 0 keeps every launch outside the margin."""

    boundary_failures: int = 1


@dataclass(frozen=True)
class ProbeSpec:
    """Early stop: a short probe (the objective's workload with `fraction` of its output
    tokens) before the full benchmark; a trial whose probe is below `prune_below` × the best
    probe so far is pruned (single objective only). fraction 0 turns it off."""

    fraction: float = 0.25
    prune_below: float = 0.8
    min_trials: int = 2


@dataclass(frozen=True)
class ObjectiveSpec:
    workload: str
    metric: str
    direction: str  # "maximize" | "minimize"

    @property
    def key(self) -> str:
        return f"{self.workload}.{self.metric}"


@dataclass(frozen=True)
class SloSpec:
    """A service-level bound on one measured metric; violations become Optuna constraints."""

    workload: str
    metric: str
    max: float | None = None
    min: float | None = None

    @property
    def key(self) -> str:
        return f"{self.workload}.{self.metric}"

    @property
    def constraint_name(self) -> str:
        return f"slo:{self.key}"

    def violation(self, value: float) -> float:
        """Relative violation: ≤ 0 met, > 0 missed by that fraction of the bound."""
        if self.max is not None:
            return (value - self.max) / max(abs(self.max), 1e-9)
        assert self.min is not None
        return (self.min - value) / max(abs(self.min), 1e-9)

    def describe(self) -> str:
        return f"{self.key} {'<=' if self.max is not None else '>='} {self.max if self.max is not None else self.min:g}"


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path | None
    server: ServerSpec
    params: tuple[ParamSpec, ...]
    workloads: tuple[Workload, ...]
    objectives: tuple[ObjectiveSpec, ...]
    bench: BenchSpec
    baseline: Mapping[str, Any] | None
    hardware: Mapping[str, Any]
    model: Mapping[str, Any]
    slos: tuple[SloSpec, ...] = ()
    quality: QualitySpec = field(default_factory=QualitySpec)
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    feasibility: FeasibilitySpec = field(default_factory=FeasibilitySpec)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {p.flag: p.distribution() for p in self.params}

    def launch_flags(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fixed server args with the tuned values substituted (tuned wins)."""
        merged = dict(self.server.args)
        merged.update(params)
        return merged

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


# ---------------------------------------------------------------- validation helpers


def _fail(where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}; {fix}")


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str], required: set[str] = set()) -> None:
    for key in data:
        if key not in allowed:
            raise _fail(f"{where}.{key}", "unknown key", f"use one of: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in data:
            raise _fail(f"{where}.{key}", "missing", "add it")


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(where, f"must be a mapping, got {type(value).__name__}", "write it as `key: value` lines")
    return value


def _number(where: str, value: Any, *, integer: bool = False, positive: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise _fail(where, f"must be {kind}, got {value!r}", f"set it to {kind}")
    if positive and value <= 0:
        raise _fail(where, f"must be > 0, got {value!r}", "use a positive value")
    return value


def _flag_name(where: str, key: Any) -> str:
    if not isinstance(key, str) or not key or key.startswith("-") or "_" in key:
        raise _fail(where, f"bad flag name {key!r}", "write launch flags without leading dashes, with dashes not underscores (e.g. kt-num-gpu-experts)")
    if key in RESERVED_FLAGS:
        raise _fail(f"{where}.{key}", "is set by kttune for every trial", "remove it (use server.host / server.port)")
    return key


def _resolve_python(where: str, value: Any, base: Path, check: bool = True) -> str:
    if value is None:
        return sys.executable
    if not isinstance(value, str) or not value:
        raise _fail(where, f"must be a path to a Python interpreter, got {value!r}", "set it or remove it to use the current one")
    found = shutil.which(value) if os.sep not in value else None
    path = Path(found) if found else Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = (base / path)
    if check and not (path.is_file() and os.access(path, os.X_OK)):
        raise _fail(where, f"interpreter {value!r} not found or not executable", "point it at the python of the environment that has sglang installed")
    return str(path)


# ---------------------------------------------------------------- sections


def _parse_param(where: str, flag: str, spec: Any) -> ParamSpec:
    spec = _mapping(where, spec)
    _check_keys(where, spec, {"low", "high", "step", "log", "choices", "type"})
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise _fail(f"{where}.choices", "must be a non-empty list", "list at least one value")
        for c in choices:
            if not isinstance(c, (int, float, str, bool)) or c is None:
                raise _fail(f"{where}.choices", f"bad choice {c!r}", "use numbers, strings or booleans")
        if len(set(map(repr, choices))) != len(choices):
            raise _fail(f"{where}.choices", "has duplicates", "list each value once")
        if set(spec) - {"choices"}:
            raise _fail(where, "choices cannot be combined with low/high/step/log", "use either choices or a range")
        return ParamSpec(flag=flag, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise _fail(where, "needs either choices or low and high", "add low: and high:")
    kind = spec.get("type")
    if kind not in (None, "int", "float"):
        raise _fail(f"{where}.type", f"unknown type {kind!r}", "use int or float")
    is_float = kind == "float" or any(isinstance(spec.get(k), float) for k in ("low", "high", "step"))
    low = _number(f"{where}.low", spec["low"], integer=not is_float)
    high = _number(f"{where}.high", spec["high"], integer=not is_float)
    if low > high:
        raise _fail(where, f"empty range low={low} > high={high}", "make low ≤ high")
    step = spec.get("step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _fail(f"{where}.log", f"must be true or false, got {log!r}", "set true or false")
    if step is not None:
        step = _number(f"{where}.step", step, integer=not is_float, positive=True)
        if log:
            raise _fail(where, "step and log cannot be combined", "drop one of them")
        if not is_float and (high - low) % step != 0:
            raise _fail(where, f"high - low ({high - low}) is not a multiple of step {step}", f"set high to {low + (high - low) // step * step}")
    if log and low <= 0:
        raise _fail(f"{where}.low", f"must be > 0 with log: true, got {low}", "raise low or drop log")
    return ParamSpec(flag=flag, low=low, high=high, step=step, log=log, is_float=is_float)


def _parse_server(data: Mapping[str, Any], base: Path, check: bool) -> ServerSpec:
    where = "server"
    _check_keys(where, data, {"python", "module", "command", "host", "port", "start_timeout_s", "env", "args"})
    command = data.get("command")
    if command is not None:
        if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
            raise _fail(f"{where}.command", "must be a non-empty list of strings", "e.g. [/opt/sglang/bin/python, -m, sglang.launch_server]")
        if "module" in data:
            raise _fail(where, "module and command are exclusive", "keep one of them")
    module = data.get("module", "sglang.launch_server") if command is None else None
    if module is not None and (not isinstance(module, str) or not module):
        raise _fail(f"{where}.module", f"must be a module name, got {module!r}", "e.g. sglang.launch_server")
    host = data.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise _fail(f"{where}.host", f"must be a host address, got {host!r}", "use 127.0.0.1")
    port = data.get("port")
    if port is not None:
        port = int(_number(f"{where}.port", port, integer=True, positive=True))
        if port > 65535:
            raise _fail(f"{where}.port", f"{port} is not a TCP port", "use 1024-65535 or remove it for a fresh free port per trial")
    timeout = _number(f"{where}.start_timeout_s", data.get("start_timeout_s", 1800), positive=True)
    env = {str(k): str(v) for k, v in _mapping(f"{where}.env", data.get("env")).items()}
    args: dict[str, Any] = {}
    for key, value in _mapping(f"{where}.args", data.get("args")).items():
        flag = _flag_name(f"{where}.args", key)
        if value is None:
            raise _fail(f"{where}.args.{flag}", "has no value", "give it a value, or true for a switch")
        args[flag] = value
    python = _resolve_python(f"{where}.python", data.get("python"), base, check)
    return ServerSpec(python=python, module=module, command=tuple(command) if command else None,
                      host=host, port=port, start_timeout_s=float(timeout), env=env, args=args)


def _parse_workloads(data: Any) -> tuple[Workload, ...]:
    raw = DEFAULT_WORKLOADS if data is None else _mapping("workloads", data)
    if not raw:
        raise _fail("workloads", "is empty", "define at least one workload or remove the key for the defaults")
    allowed = {"num_prompts", "input_len", "output_len", "range_ratio", "dataset_name", "max_concurrency", "request_rate", "extra_args"}
    out = []
    for name, spec in raw.items():
        where = f"workloads.{name}"
        spec = _mapping(where, spec)
        _check_keys(where, spec, allowed, {"num_prompts", "input_len", "output_len"})
        nums = {k: int(_number(f"{where}.{k}", spec[k], integer=True, positive=True)) for k in ("num_prompts", "input_len", "output_len")}
        ratio = _number(f"{where}.range_ratio", spec.get("range_ratio", 1.0))
        if not 0.0 <= ratio <= 1.0:
            raise _fail(f"{where}.range_ratio", f"must be within [0, 1], got {ratio}", "use 1.0 for fixed lengths")
        conc = spec.get("max_concurrency")
        if conc is not None:
            conc = int(_number(f"{where}.max_concurrency", conc, integer=True, positive=True))
        rate = spec.get("request_rate")
        if rate is not None:
            rate = float(_number(f"{where}.request_rate", rate, positive=True))
        extra = dict(_mapping(f"{where}.extra_args", spec.get("extra_args")))
        for key in extra:
            _flag_name(f"{where}.extra_args", key)
        out.append(Workload(name=str(name), range_ratio=float(ratio), dataset_name=str(spec.get("dataset_name", "random")),
                            max_concurrency=conc, request_rate=rate, extra_args=extra, **nums))
    return tuple(out)


def _parse_objectives(data: Any, workloads: tuple[Workload, ...]) -> tuple[ObjectiveSpec, ...]:
    raw = DEFAULT_OBJECTIVE if data is None else data
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _fail("objective", "must be a list of {workload, metric, direction}", "e.g. [{workload: decode, metric: output_throughput}]")
    names = {w.name for w in workloads}
    out = []
    for i, spec in enumerate(raw):
        where = f"objective[{i}]"
        spec = _mapping(where, spec)
        _check_keys(where, spec, {"workload", "metric", "direction"}, {"workload", "metric"})
        if spec["workload"] not in names:
            raise _fail(f"{where}.workload", f"unknown workload {spec['workload']!r}", f"use one of: {', '.join(sorted(names))}")
        direction = spec.get("direction", "maximize")
        if direction not in ("maximize", "minimize"):
            raise _fail(f"{where}.direction", f"must be maximize or minimize, got {direction!r}", "fix the spelling")
        out.append(ObjectiveSpec(workload=str(spec["workload"]), metric=str(spec["metric"]), direction=direction))
    if len({o.key for o in out}) != len(out):
        raise _fail("objective", "lists the same metric twice", "remove the duplicate")
    return tuple(out)


_SLO_OPS = {"<=": "max", "<": "max", ">=": "min", ">": "min"}


def _parse_slos(data: Any, workloads: tuple[Workload, ...]) -> tuple[SloSpec, ...]:
    """`slo:` is a list of {workload, metric, max|min} or strings like
    "decode.p99_ttft_ms <= 5000"."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise _fail("slo", "must be a list", "e.g. [{workload: decode, metric: p99_ttft_ms, max: 5000}]")
    names = {w.name for w in workloads}
    out = []
    for i, item in enumerate(data):
        where = f"slo[{i}]"
        if isinstance(item, str):
            parts = item.split()
            if len(parts) != 3 or parts[1] not in _SLO_OPS or "." not in parts[0]:
                raise _fail(where, f"cannot read {item!r}", "write it as 'workload.metric <= number'")
            wl, _, metric = parts[0].partition(".")
            try:
                bound = float(parts[2])
            except ValueError:
                raise _fail(where, f"bound {parts[2]!r} is not a number", "use a number") from None
            item = {"workload": wl, "metric": metric, _SLO_OPS[parts[1]]: bound}
        item = _mapping(where, item)
        _check_keys(where, item, {"workload", "metric", "max", "min"}, {"workload", "metric"})
        if item["workload"] not in names:
            raise _fail(f"{where}.workload", f"unknown workload {item['workload']!r}", f"use one of: {', '.join(sorted(names))}")
        if ("max" in item) == ("min" in item):
            raise _fail(where, "needs exactly one of max or min", "e.g. max: 5000")
        bound_key = "max" if "max" in item else "min"
        bound = _number(f"{where}.{bound_key}", item[bound_key])
        out.append(SloSpec(workload=str(item["workload"]), metric=str(item["metric"]), **{bound_key: float(bound)}))
    return tuple(out)


def _parse_bench(data: Mapping[str, Any], base: Path, check: bool) -> BenchSpec:
    where = "bench"
    _check_keys(where, data, {"python", "module", "backend", "dataset_path", "tokenizer", "model", "timeout_s", "seed", "env", "time_scale"})

    def local_path(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _fail(f"{where}.{key}", f"must be a path, got {value!r}", "set a local path")
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else base / path
        if check and key == "dataset_path" and not path.exists():
            raise _fail(f"{where}.{key}", f"{path} does not exist", "point it at a ShareGPT-format JSON file")
        if key == "tokenizer" and not path.exists():
            return value  # may be a hub id; bench_serving resolves it
        return str(path)

    time_scale = _number(f"{where}.time_scale", data.get("time_scale", 1.0), positive=True)
    return BenchSpec(
        python=_resolve_python(f"{where}.python", data.get("python"), base, check),
        module=str(data.get("module", "sglang.bench_serving")),
        backend=str(data.get("backend", "sglang")),
        dataset_path=local_path("dataset_path"),
        tokenizer=local_path("tokenizer"),
        model=data.get("model"),
        timeout_s=float(_number(f"{where}.timeout_s", data.get("timeout_s", 3600), positive=True)),
        seed=int(_number(f"{where}.seed", data.get("seed", 1), integer=True)),
        env={str(k): str(v) for k, v in _mapping(f"{where}.env", data.get("env")).items()},
        time_scale=float(time_scale),
    )


def _check_value_in(where: str, spec: ParamSpec, value: Any) -> None:
    if spec.choices is not None:
        if value not in spec.choices:
            raise _fail(where, f"{value!r} is not one of the choices {list(spec.choices)}", "add it to the choices or change it")
        return
    _number(where, value, integer=not spec.is_float)
    assert spec.low is not None and spec.high is not None
    if not spec.low <= value <= spec.high:
        raise _fail(where, f"{value} is outside [{spec.low}, {spec.high}]", "widen the range or change the value")
    if spec.step and not spec.is_float and (value - spec.low) % spec.step != 0:
        raise _fail(where, f"{value} is not on the grid low + k·{spec.step}", "change the value or the step")


def _resolve_model_paths(args: dict[str, Any], base: Path) -> None:
    for key in ("model-path", "model", "kt-weight-path", "tokenizer-path"):
        value = args.get(key)
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)) and (base / value).exists():
            args[key] = str((base / value).resolve())


def parse_space(data: Any, *, path: Path | None = None, check_paths: bool = True) -> SearchSpace:
    """Validate a loaded YAML document. Raises ConfigError naming the field."""
    # Relative paths inside a space are read from the working directory (the repo root).
    data = _mapping("space", data)
    _check_keys("space", data, {"name", "description", "server", "params", "workloads", "objective", "bench", "baseline", "hardware", "model", "slo", "quality", "confirm", "probe", "feasibility"}, {"server", "params"})
    server = _parse_server(_mapping("server", data["server"]), Path.cwd(), check_paths)
    args = dict(server.args)
    _resolve_model_paths(args, Path.cwd())
    model_path = args.get("model-path", args.get("model"))
    if model_path is None:
        raise _fail("server.args.model-path", "missing", "set the model directory (the one with config.json)")
    if check_paths and not Path(os.path.expanduser(str(model_path))).exists():
        raise _fail("server.args.model-path", f"{model_path} does not exist", "point it at the local model directory")
    server = ServerSpec(**{**server.__dict__, "args": args})
    params_raw = _mapping("params", data["params"])
    if not params_raw:
        raise _fail("params", "is empty", "tune at least one flag, e.g. kt-num-gpu-experts: {low: 0, high: 200}")
    params = tuple(_parse_param(f"params.{_flag_name('params', k)}", k, v) for k, v in params_raw.items())
    workloads = _parse_workloads(data.get("workloads"))
    objectives = _parse_objectives(data.get("objective"), workloads)
    bench = _parse_bench(_mapping("bench", data.get("bench")), Path.cwd(), check_paths)
    baseline = data.get("baseline")
    if baseline is not None:
        baseline = dict(_mapping("baseline", baseline))
        by_flag = {p.flag: p for p in params}
        for key, value in baseline.items():
            if key not in by_flag:
                raise _fail(f"baseline.{key}", "is not a tuned param", f"use one of: {', '.join(by_flag)}")
            _check_value_in(f"baseline.{key}", by_flag[key], value)
        missing = set(by_flag) - set(baseline)
        if missing:
            raise _fail("baseline", f"lacks {', '.join(sorted(missing))}", "give every tuned param a value")
    name = data.get("name") or (path.stem if path else "space")
    if not isinstance(name, str):
        raise _fail("name", f"must be a string, got {name!r}", "quote it")
    return SearchSpace(name=name, path=path, server=server, params=params, workloads=workloads,
                       objectives=objectives, bench=bench, baseline=baseline,
                       hardware=dict(_mapping("hardware", data.get("hardware"))),
                       model=dict(_mapping("model", data.get("model"))),
                       slos=_parse_slos(data.get("slo"), workloads),
                       quality=QualitySpec.from_space(SimpleNamespace(quality=dict(_mapping("quality", data.get("quality"))))),
                       confirm=_parse_confirm(_mapping("confirm", data.get("confirm"))),
                       probe=_parse_probe(_mapping("probe", data.get("probe"))),
                       feasibility=_parse_feasibility(_mapping("feasibility", data.get("feasibility"))))


def _parse_confirm(data: Mapping[str, Any]) -> ConfirmSpec:
    _check_keys("confirm", data, {"runs", "finalists", "noise", "recheck"})
    runs, finalists = data.get("runs"), data.get("finalists", 2)
    noise, recheck = data.get("noise", ConfirmSpec.noise), data.get("recheck", ConfirmSpec.recheck)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 < noise < 1:
        raise _fail("confirm.noise", f"must be a relative spread between 0 and 1, got {noise!r}", "e.g. confirm: {noise: 0.03}")
    if not isinstance(recheck, bool):
        raise _fail("confirm.recheck", f"must be true or false, got {recheck!r}", "e.g. confirm: {recheck: true}")
    if runs is not None and (not isinstance(runs, int) or isinstance(runs, bool) or runs < 0):
        raise _fail("confirm.runs", f"must be a whole number ≥ 0, got {runs!r}", "e.g. confirm: {runs: 2}")
    if not isinstance(finalists, int) or isinstance(finalists, bool) or finalists < 1:
        raise _fail("confirm.finalists", f"must be a whole number ≥ 1, got {finalists!r}", "e.g. confirm: {finalists: 2}")
    return ConfirmSpec(runs=runs, finalists=finalists, noise=float(noise), recheck=recheck)


def _parse_feasibility(data: Mapping[str, Any]) -> FeasibilitySpec:
    _check_keys("feasibility", data, {"boundary_failures"})
    n = data.get("boundary_failures", FeasibilitySpec.boundary_failures)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise _fail("feasibility.boundary_failures", f"must be a whole number ≥ 0, got {n!r}",
                    "e.g. feasibility: {boundary_failures: 1}; 0 never launches inside the safety margin")
    return FeasibilitySpec(boundary_failures=n)


def _parse_probe(data: Mapping[str, Any]) -> ProbeSpec:
    _check_keys("probe", data, {"fraction", "prune_below", "min_trials"})
    spec = ProbeSpec()
    fraction = data.get("fraction", spec.fraction)
    below = data.get("prune_below", spec.prune_below)
    min_trials = data.get("min_trials", spec.min_trials)
    if not is_finite(fraction) or not 0 <= fraction < 1:
        raise _fail("probe.fraction", f"must be in [0, 1), got {fraction!r}", "e.g. 0.25; 0 turns the probe off")
    if not is_finite(below) or not 0 < below <= 1:
        raise _fail("probe.prune_below", f"must be in (0, 1], got {below!r}", "e.g. 0.8: prune below 80 % of the best probe")
    if not isinstance(min_trials, int) or isinstance(min_trials, bool) or min_trials < 1:
        raise _fail("probe.min_trials", f"must be a whole number ≥ 1, got {min_trials!r}", "e.g. 2")
    return ProbeSpec(fraction=float(fraction), prune_below=float(below), min_trials=min_trials)


def load_space(path: str | Path, *, check_paths: bool = True) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space: {p} does not exist; pass a file from search_spaces/")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{at}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    return parse_space(data, path=p, check_paths=check_paths)


def is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
