"""The typed form of a search space: frozen dataclasses for every section, and the constants
other packages key on (AUTO, CAPACITY_FLAGS). Parsing and validation are in
:mod:`tuner.config.parse`; everything downstream works on `SearchSpace`."""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from tuner.config.quality import QualitySpec

Direction = Literal["maximize", "minimize"]

Scalar = int | float | str | bool
#: A flag value kttune computes before launch (max-total-tokens: from the model and the machine).
AUTO = "auto"
#: Flags whose throughput rises until GPU memory runs out: searched from their fitting boundary.
CAPACITY_FLAGS = ("kt-num-gpu-experts",)
#: Flags redacted wherever kttune writes, unless the space lists its own `secret:` flags.
DEFAULT_SECRETS = ("api-key", "admin-api-key")
#: Flags that change what the model outputs, not only how fast: tuned only under the quality check.
ACCURACY_FLAGS = ("kt-max-deferred-experts-per-token",)
#: Flags that act only while another flag is set (truthy): sglang-kt updates the GPU experts
#: dynamically only after a layerwise prefill, which needs a prefill token threshold.
PREREQUISITES: Mapping[str, str] = {"kt-enable-dynamic-expert-update": "kt-gpu-prefill-token-threshold"}
#: A param named ``env:NAME`` sets the server's environment variable NAME instead of a flag.
ENV_PREFIX = "env:"
#: The placement flag, its value that reads a recorded expert distribution, and that file's flag.
PLACEMENT_FLAG = "kt-expert-placement-strategy"
FREQUENCY = "frequency"
EXPERT_LOCATION_FLAG = "init-expert-location"


def split_env(flags: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(launch flags, environment variables) of what `SearchSpace.launch_flags` returned."""
    plain = {k: v for k, v in flags.items() if not k.startswith(ENV_PREFIX)}
    env = {k[len(ENV_PREFIX):]: str(v) for k, v in flags.items() if k.startswith(ENV_PREFIX) and v is not None}
    return plain, env


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
    # No new start-up phase in the log for this long ends a launch as `stalled` (or `unhealthy`).
    stall_timeout_s: float = 600.0

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

    @property
    def offered(self) -> int:
        """Requests the benchmark keeps in flight at once."""
        return self.max_concurrency or self.num_prompts

    def kv_need_tokens(self, max_running: int | None, chunk: int | None) -> int:
        """KV tokens that keep the requests this workload runs at once resident until they
        finish: min(max-running-requests, offered) of them. A request that generates one token
        is done in the forward that prefills it, so only one chunk's worth of those coexist."""
        at_once = min(max_running or self.offered, self.offered)
        if self.output_len <= 1 and chunk and chunk > 0:
            at_once = min(at_once, max(1, math.ceil(chunk / max(self.input_len, 1))))
        return at_once * self.tokens_per_request()


@dataclass(frozen=True)
class BenchSpec:
    python: str
    module: str | None  # None: found in `python` (tuner.bench.resolve_bench) before the first launch
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
    # The client takes --goodput (upstream's): the space's latency SLOs are passed to it.
    goodput: bool = False


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
    direction: Direction

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
    # Flags whose values kttune never writes down (server.args only; a secret is not tuned).
    secrets: tuple[str, ...] = DEFAULT_SECRETS
    # The YAML document as given and the folder its relative paths were read from: what a study
    # stores, so that the commands that only read it need no file.
    document: Mapping[str, Any] = field(default_factory=dict)
    base: Path | None = None

    def secret_values(self) -> dict[str, str]:
        """The secret flags set in server.args, with their values."""
        return {flag: str(self.server.args[flag]) for flag in self.secrets
                if isinstance(self.server.args.get(flag), (str, int)) and str(self.server.args[flag])}

    def redact(self, value: Any) -> Any:
        """`value` (a string, or lists and mappings of them) with every secret value replaced by
        a placeholder naming its flag: what kttune stores, writes and prints. The server still
        gets the real value."""
        secrets = self.secret_values()
        if not secrets:
            return value
        return _redact(value, {v: f"<secret {flag}>" for flag, v in secrets.items()})

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {p.flag: p.distribution() for p in self.params}

    def launch_flags(self, params: Mapping[str, Any], *, expert_location: str | None = None) -> dict[str, Any]:
        """Fixed server args with the tuned values substituted (tuned wins); tuned environment
        variables stay in under their ``env:NAME`` keys (`split_env` separates them). With
        `frequency` placement and no file of its own, `expert_location` (the study's recorded
        expert distribution) is the file it reads."""
        values = {**self.server.args, **params}
        merged = {k: fill_param_refs(v, values) for k, v in self.server.args.items()}
        merged.update(params)
        if (expert_location is not None and merged.get(PLACEMENT_FLAG) == FREQUENCY
                and EXPERT_LOCATION_FLAG not in self.server.args):
            merged[EXPERT_LOCATION_FLAG] = expert_location
        return merged

    def fixed_arg_values(self, flag: str) -> list[str]:
        """Every value the fixed arg `flag` takes at launch: one per combination of the choices of
        the tuned flags it names in braces (`fill_param_refs`), the baseline's for the rest."""
        base = dict(self.baseline or {})
        refs = set(PARAM_REF.findall(str(self.server.args[flag])))
        varied = [p for p in self.params if p.flag in refs and p.choices is not None]
        combos = itertools.product(*(p.choices or () for p in varied))  # one empty combination when none varies
        return sorted({str(self.launch_flags({**base, **dict(zip((p.flag for p in varied), c))})[flag]) for c in combos})

    def unknown_param_ref(self) -> tuple[str, str] | None:
        """(fixed arg, name) of the first ``{name}`` in a fixed arg that names no flag of the space."""
        named = {p.flag for p in self.params} | set(self.server.args)
        for key, value in self.server.args.items():
            for ref in PARAM_REF.findall(value) if isinstance(value, str) else ():
                if ref not in named:
                    return key, ref
        return None

    def offers_frequency_placement(self) -> bool:
        """True when the space searches placement and `frequency` is one of the choices: the
        study then records an expert distribution first."""
        return any(p.flag == PLACEMENT_FLAG and p.choices is not None and FREQUENCY in p.choices
                   for p in self.params)

    def kv_need_tokens(self, flags: Mapping[str, Any]) -> dict[str, int]:
        """Per workload, the KV tokens it needs at once with these launch flags
        (`Workload.kv_need_tokens`)."""
        def num(key: str) -> int | None:
            v = flags.get(key)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None
        return {w.name: w.kv_need_tokens(num("max-running-requests"), num("chunked-prefill-size")) for w in self.workloads}

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]


# "{flag}" inside a fixed arg names a tuned flag whose value it takes at launch.
PARAM_REF = re.compile(r"\{([a-z0-9][a-z0-9-]*)\}")


def fill_param_refs(value: Any, params: Mapping[str, Any]) -> Any:
    """`value` with each ``{flag}`` that names a flag in `params` replaced by its value; other
    braces are left as they are (a JSON override is not a reference). A fixed arg can then follow
    a tuned one: kt-kernel's pre-quantized CPU weights are cut once per thread-pool count, so
    ``kt-weight-path: /w/kimi-pools{kt-threadpool-count}`` picks the folder that matches."""
    if not isinstance(value, str) or "{" not in value:
        return value
    return PARAM_REF.sub(lambda m: str(params[m.group(1)]) if m.group(1) in params else m.group(0), value)


def _redact(value: Any, placeholders: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for secret, placeholder in placeholders.items():
            value = value.replace(secret, placeholder)
        return value
    if isinstance(value, Mapping):
        return {k: _redact(v, placeholders) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, placeholders) for v in value)
    if isinstance(value, int) and not isinstance(value, bool) and str(value) in placeholders:
        return placeholders[str(value)]
    return value


def is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
