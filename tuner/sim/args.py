"""Command line of the simulated server: `sglang.launch_server` flags plus `--sim-*` flags.

The parser mirrors the real one where kttune can observe it: flag names and aliases, types,
defaults, store_true flags, `--config FILE.yaml` merging (sglang `server_args_config_parser.py`),
and `error: unrecognized arguments` (exit 2) for removed `--kt-amx-*` flags. Other unknown flags
are tolerated and reported as warnings, as a newer server would accept flags this copy lacks.

`--sim-dialect` picks which server it plays: `sglang-kt` (0.7.2, the default) or `upstream`
(sglang 0.5.23), whose parser has only six `--kt-*` flags (`srt/arg_groups/fields/exec_.py`) and
refuses the others as unrecognized arguments, and adds the paged-experts offload flags.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from tuner.sim.faults import Faults, parse_faults

if TYPE_CHECKING:
    from tuner.sim.perfmodel.config import SimConfig

PROG = "launch_server.py"
REMOVED_PREFIXES = ("--kt-amx-",)

ATTENTION_BACKENDS = (
    "triton", "torch_native", "flex_attention", "nsa", "cutlass_mla", "fa3", "fa4",
    "flashinfer", "flashmla", "trtllm_mla", "trtllm_mha", "dual_chunk_flash_attn",
    "aiter", "wave", "intel_amx", "ascend", "intel_xpu",
)
KV_CACHE_DTYPES = ("auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16", "fp4_e2m1")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
PLACEMENTS = ("frequency", "front-loading", "uniform", "random")

# (flags, kwargs) in ServerArgs field order, so the `server_args=ServerArgs(...)` line reads alike.
_FLAGS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--model-path", "--model"), dict(type=str, required=True)),
    (("--tokenizer-path",), dict(type=str, default=None)),
    (("--tokenizer-mode",), dict(type=str, default="auto")),
    (("--skip-tokenizer-init",), dict(action="store_true")),
    (("--load-format",), dict(type=str, default="auto")),
    (("--trust-remote-code",), dict(action="store_true")),
    (("--context-length",), dict(type=int, default=None)),
    (("--is-embedding",), dict(action="store_true")),
    (("--revision",), dict(type=str, default=None)),
    (("--host",), dict(type=str, default="127.0.0.1")),
    (("--port",), dict(type=int, default=30000)),
    (("--skip-server-warmup",), dict(action="store_true")),
    (("--warmups",), dict(type=str, default=None)),
    (("--dtype",), dict(type=str, default="auto", choices=DTYPES)),
    (("--quantization",), dict(type=str, default=None)),
    (("--kv-cache-dtype",), dict(type=str, default="auto", choices=KV_CACHE_DTYPES)),
    (("--mem-fraction-static",), dict(type=float, default=None)),
    (("--max-running-requests",), dict(type=int, default=None)),
    (("--max-queued-requests",), dict(type=int, default=None)),
    (("--max-total-tokens",), dict(type=int, default=None)),
    (("--chunked-prefill-size",), dict(type=int, default=None)),
    (("--max-prefill-tokens",), dict(type=int, default=16384)),
    (("--schedule-policy",), dict(type=str, default="fcfs")),
    (("--schedule-conservativeness",), dict(type=float, default=1.0)),
    (("--page-size",), dict(type=int, default=None)),
    (("--device",), dict(type=str, default=None)),
    (("--tensor-parallel-size", "--tp-size"), dict(type=int, default=1, dest="tp_size")),
    (("--pipeline-parallel-size", "--pp-size"), dict(type=int, default=1, dest="pp_size")),
    (("--stream-interval",), dict(type=int, default=1)),
    (("--random-seed",), dict(type=int, default=None)),
    (("--watchdog-timeout",), dict(type=float, default=300)),
    (("--dist-timeout",), dict(type=int, default=None)),
    (("--download-dir",), dict(type=str, default=None)),
    (("--base-gpu-id",), dict(type=int, default=0)),
    (("--log-level",), dict(type=str, default="info")),
    (("--log-level-http",), dict(type=str, default=None)),
    (("--log-requests",), dict(action="store_true")),
    (("--show-time-cost",), dict(action="store_true")),
    (("--enable-metrics",), dict(action="store_true")),
    (("--decode-log-interval",), dict(type=int, default=40)),
    (("--api-key",), dict(type=str, default=None)),
    (("--served-model-name",), dict(type=str, default=None)),
    (("--chat-template",), dict(type=str, default=None)),
    (("--reasoning-parser",), dict(type=str, default=None)),
    (("--tool-call-parser",), dict(type=str, default=None)),
    (("--data-parallel-size", "--dp-size"), dict(type=int, default=1, dest="dp_size")),
    (("--dist-init-addr",), dict(type=str, default=None)),
    (("--nnodes",), dict(type=int, default=1)),
    (("--node-rank",), dict(type=int, default=0)),
    (("--attention-backend",), dict(type=str, default=None, choices=ATTENTION_BACKENDS)),
    (("--sampling-backend",), dict(type=str, default=None)),
    (("--grammar-backend",), dict(type=str, default=None)),
    (("--speculative-algorithm",), dict(type=str, default=None)),
    (("--expert-parallel-size", "--ep-size"), dict(type=int, default=1, dest="ep_size")),
    (("--moe-runner-backend",), dict(type=str, default="auto")),
    (("--init-expert-location",), dict(type=str, default="trivial")),
    (("--expert-distribution-recorder-mode",), dict(type=str, default=None)),
    (("--expert-distribution-recorder-buffer-size",), dict(type=int, default=None)),
    (("--enable-hierarchical-cache",), dict(action="store_true")),
    (("--kt-weight-path",), dict(type=str, default=None)),
    (("--kt-method",), dict(type=str, default="AMXINT4")),
    (("--kt-cpuinfer",), dict(type=int, default=None)),
    (("--kt-threadpool-count",), dict(type=int, default=2)),
    (("--kt-numa-nodes",), dict(type=int, nargs="+", default=None)),
    (("--kt-num-gpu-experts",), dict(type=int, default=None)),
    (("--kt-gpu-experts-ratio",), dict(type=float, default=None)),
    (("--kt-max-deferred-experts-per-token",), dict(type=int, default=None)),
    (("--kt-gpu-prefill-token-threshold",), dict(type=int, default=None)),
    (("--record-kt-gpu-expert-distribution",), dict(action="store_true")),
    (("--kt-enable-dynamic-expert-update",), dict(action="store_true")),
    (("--kt-expert-placement-strategy",), dict(type=str, default="uniform", choices=PLACEMENTS)),
    (("--cpu-offload-gb",), dict(type=int, default=0)),
    (("--disable-radix-cache",), dict(action="store_true")),
    (("--cuda-graph-max-bs",), dict(type=int, default=None)),
    (("--cuda-graph-bs",), dict(type=int, nargs="+", default=None)),
    (("--disable-cuda-graph",), dict(action="store_true")),
    (("--disable-cuda-graph-padding",), dict(action="store_true")),
    (("--enable-nccl-nvls",), dict(action="store_true")),
    (("--disable-custom-all-reduce",), dict(action="store_true")),
    (("--disable-overlap-schedule",), dict(action="store_true")),
    (("--enable-mixed-chunk",), dict(action="store_true")),
    (("--enable-dp-attention",), dict(action="store_true")),
    (("--enable-two-batch-overlap",), dict(action="store_true")),
    (("--enable-torch-compile",), dict(action="store_true")),
    (("--torch-compile-max-bs",), dict(type=int, default=32)),
    (("--enable-p2p-check",), dict(action="store_true")),
    (("--triton-attention-reduce-in-fp32",), dict(action="store_true")),
    (("--num-continuous-decode-steps",), dict(type=int, default=1)),
    (("--allow-auto-truncate",), dict(action="store_true")),
    (("--enable-custom-logit-processor",), dict(action="store_true")),
    (("--disable-shared-experts-fusion",), dict(action="store_true")),
    (("--disable-chunked-prefix-cache",), dict(action="store_true")),
    (("--enable-cache-report",), dict(action="store_true")),
    (("--enable-deterministic-inference",), dict(action="store_true")),
    (("--config",), dict(type=str, default=None)),
)

SIM_DESTS = ("sim_scenario", "sim_time_scale", "sim_noise", "sim_seed", "sim_fault", "sim_dialect",
             "sim_no_memory_log")
DIALECTS = ("sglang-kt", "upstream")
DEFAULT_DIALECT = "sglang-kt"
# (distribution, version) each dialect reports, as its package metadata would.
DIALECT_PACKAGES = {"sglang-kt": ("sglang-kt", "0.7.2"), "upstream": ("sglang", "0.5.23")}
# sglang-kt's KT flags that upstream 0.5.23 does not have.
UPSTREAM_LACKS = ("--kt-numa-nodes", "--kt-gpu-experts-ratio", "--kt-gpu-prefill-token-threshold",
                  "--record-kt-gpu-expert-distribution", "--kt-enable-dynamic-expert-update",
                  "--kt-expert-placement-strategy")
_UPSTREAM_ONLY: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--enable-paged-experts",), dict(action="store_true")),
    (("--paged-experts-num-resident",), dict(type=int, default=None)),
)


class UsageError(Exception):
    """argparse-style usage error; the caller prints `usage` + message and exits 2."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class ConfigFileError(Exception):
    """`--config` problems: the real server raises ValueError (traceback, exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())


@dataclass(frozen=True)
class SimOptions:
    """The simulator's own knobs (never seen by a real server)."""

    scenario: str
    time_scale: float
    noise: float
    seed: int | None
    faults: Faults
    dialect: str = DEFAULT_DIALECT
    memory_log: bool = True  # False: no memory figures in the log (only the server-info read-back has them)


@dataclass(frozen=True)
class SimArgs:
    """Parsed command line: server args (dest -> value, ServerArgs order), ignored flags, sim knobs."""

    server: dict[str, Any]
    unknown: tuple[str, ...]
    sim: SimOptions

    @property
    def kt_enabled(self) -> bool:
        return self.server["kt_weight_path"] is not None

    @property
    def served_model_name(self) -> str:
        return self.server["served_model_name"] or self.server["model_path"]

    @property
    def tokenizer_path(self) -> str:
        return self.server["tokenizer_path"] or self.server["model_path"]


def build_parser(dialect: str = DEFAULT_DIALECT) -> argparse.ArgumentParser:
    """The launch_server parser of `dialect` plus the `--sim-*` flags (defaults from KTTUNE_SIM_* env)."""
    parser = _Parser(prog=PROG)
    for flags, kwargs in _FLAGS:
        if dialect == "upstream" and flags[0] in UPSTREAM_LACKS:
            continue
        parser.add_argument(*flags, **kwargs)
        if dialect == "upstream" and flags[0] == "--kt-max-deferred-experts-per-token":
            for more, more_kwargs in _UPSTREAM_ONLY:
                parser.add_argument(*more, **more_kwargs)
    env = os.environ
    sim = parser.add_argument_group("simulator")
    sim.add_argument("--sim-scenario", default=env.get("KTTUNE_SIM_SCENARIO"))
    # String defaults go through `type`, so a bad env value is a usage error too.
    sim.add_argument("--sim-time-scale", type=float, default=env.get("KTTUNE_SIM_TIME_SCALE") or "1.0")
    sim.add_argument("--sim-noise", type=float, default=env.get("KTTUNE_SIM_NOISE") or "0.025")
    sim.add_argument("--sim-seed", type=int, default=env.get("KTTUNE_SIM_SEED") or None)
    sim.add_argument("--sim-fault", default=env.get("KTTUNE_SIM_FAULT", ""))
    sim.add_argument("--sim-dialect", choices=DIALECTS, default=env.get("KTTUNE_SIM_DIALECT") or DEFAULT_DIALECT)
    sim.add_argument("--sim-no-memory-log", action="store_true",
                     default=env.get("KTTUNE_SIM_NO_MEMORY_LOG", "") not in ("", "0"))
    return parser


def dialect_of(argv: Sequence[str]) -> str:
    """The `--sim-dialect` an argv asks for (else KTTUNE_SIM_DIALECT, else sglang-kt); an
    unknown name is left for the parser to refuse."""
    for i, arg in enumerate(argv):
        if arg == "--sim-dialect" and i + 1 < len(argv):
            return argv[i + 1] if argv[i + 1] in DIALECTS else DEFAULT_DIALECT
        if arg.startswith("--sim-dialect="):
            value = arg.split("=", 1)[1]
            return value if value in DIALECTS else DEFAULT_DIALECT
    value = os.environ.get("KTTUNE_SIM_DIALECT") or DEFAULT_DIALECT
    return value if value in DIALECTS else DEFAULT_DIALECT


def parse_args(argv: Sequence[str]) -> SimArgs:
    """Parse like `prepare_server_args`; raises UsageError (exit 2) or ConfigFileError (exit 1)."""
    argv = list(argv)
    dialect = dialect_of(argv)
    parser = build_parser(dialect)
    if "--config" in argv:
        argv = merge_config(parser, argv)
    ns, unknown = parser.parse_known_args(argv)
    lacking = REMOVED_PREFIXES + (UPSTREAM_LACKS if dialect == "upstream" else ())
    removed = [u for u in unknown if u.split("=", 1)[0].startswith(lacking)]
    if removed:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}", parser.format_usage())
    values = vars(ns)
    if values["sim_time_scale"] < 0:
        raise UsageError("argument --sim-time-scale: must be >= 0", parser.format_usage())
    if not values["sim_scenario"]:
        raise UsageError(
            "the simulator needs a scenario: pass --sim-scenario NAME or set KTTUNE_SIM_SCENARIO",
            parser.format_usage(),
        )
    try:
        faults = parse_faults(values["sim_fault"] or "")
    except ValueError as exc:
        raise UsageError(f"argument --sim-fault: {exc}", parser.format_usage()) from exc
    sim = SimOptions(
        scenario=values["sim_scenario"],
        time_scale=values["sim_time_scale"],
        noise=values["sim_noise"],
        seed=values["sim_seed"],
        faults=faults,
        dialect=values["sim_dialect"],
        memory_log=not values["sim_no_memory_log"],
    )
    # A dialect without a flag runs as if it were unset (the model reads every dest).
    defaults = {a.dest: a.default for a in build_parser(DEFAULT_DIALECT)._actions if a.dest not in SIM_DESTS}
    server = {k: v for k, v in {**defaults, **values}.items() if k not in SIM_DESTS and k not in ("config", "help")}
    return SimArgs(server=server, unknown=tuple(unknown), sim=sim)


def merge_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Expand `--config FILE` the way sglang does: file values first, so the CLI wins."""
    idx = [i for i, a in enumerate(argv) if a == "--config"]
    if len(idx) > 1:
        raise ConfigFileError("Multiple config files specified! Only one allowed.")
    i = idx[0]
    if i == len(argv) - 1:
        raise ConfigFileError("No config file specified after --config flag!")
    path = Path(argv[i + 1])
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigFileError(f"Config file must be YAML format, got: {path.suffix}")
    if not path.exists():
        raise ConfigFileError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"Failed to read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError("Config file must contain a dictionary at root level")
    store_true = {a.dest for a in parser._actions if isinstance(a, argparse._StoreTrueAction)}
    out: list[str] = []
    for key, value in data.items():
        key = str(key)
        dest = key.replace("-", "_")
        if isinstance(value, bool):
            if dest in store_true:
                if value:
                    out.append(f"--{key}")
            else:
                out.extend([f"--{key}", str(value).lower()])
        elif isinstance(value, list):
            if value:
                out.append(f"--{key}")
                out.extend(str(v) for v in value)
        else:
            out.extend([f"--{key}", str(value)])
    return out + argv[:i] + argv[i + 2:]


def to_sim_config(args: SimArgs, env: Mapping[str, str] | None = None) -> SimConfig:
    """Map the parsed flags (and the server's environment, this process's by default) onto the
    performance model's configuration."""
    from tuner.sim.perfmodel.config import SimConfig

    server = args.server
    return SimConfig(
        tp=server["tp_size"],
        kt_weight_path=server["kt_weight_path"],
        kt_num_gpu_experts=server["kt_num_gpu_experts"],
        kt_gpu_experts_ratio=server["kt_gpu_experts_ratio"],
        kt_cpuinfer=server["kt_cpuinfer"],
        kt_threadpool_count=server["kt_threadpool_count"],
        kt_method=server["kt_method"],
        kt_max_deferred_experts_per_token=server["kt_max_deferred_experts_per_token"] or 0,
        kt_gpu_prefill_token_threshold=server["kt_gpu_prefill_token_threshold"] or 0,
        chunked_prefill_size=server["chunked_prefill_size"],
        max_running_requests=server["max_running_requests"],
        max_total_tokens=server["max_total_tokens"],
        mem_fraction_static=server["mem_fraction_static"],
        cuda_graph_max_bs=server["cuda_graph_max_bs"],
        enable_mixed_chunk=server["enable_mixed_chunk"],
        disable_cuda_graph=server["disable_cuda_graph"],
        context_length=server["context_length"],
        kt_expert_placement_strategy=server["kt_expert_placement_strategy"],
        init_expert_location=server["init_expert_location"],
        kt_enable_dynamic_expert_update=server["kt_enable_dynamic_expert_update"],
        rawint4_backend=(env if env is not None else os.environ).get("KT_RAWINT4_BACKEND") or None,
    )


def format_server_args(server: dict[str, Any]) -> str:
    """The `server_args=ServerArgs(...)` log line body."""
    body = ", ".join(f"{k}={v!r}" for k, v in server.items())
    return f"server_args=ServerArgs({body})"
