"""Export a trial as a launch profile that `sglang.launch_server --config FILE` accepts as-is.

SGLang's config parser wants a flat mapping of dashed flag names; store_true switches as
booleans, lists for multi-value flags, scalars otherwise. Only server flags go in: not the
deployment's host and port, not the simulator's flags, not the switches that exist for a fair
benchmark. Provenance, what was left out and the values to replace go in comments.
"""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial

from tuner.config import RESERVED_FLAGS, split_env
from tuner.errors import ConfigError
from tuner.report.outpath import check_out_file
from tuner.storage import ATTR_FLAGS, metrics_of
from tuner.trial import PROBE_SUFFIX

# The simulator's own flags (`python -m tuner.sim` adds --sim-*); no SGLang flag starts so.
SIMULATOR_PREFIX = "sim-"
# Switches that make a benchmark fair and a production server slower: with the radix cache (and
# the chunked prefix cache) on, repeated benchmark prompts would be served from cache.
BENCHMARK_ONLY_FLAGS = ("disable-radix-cache", "disable-chunked-prefix-cache")
# Flags naming files of the model; on a simulated study they point at the simulator's stand-ins.
PATH_FLAGS = ("model-path", "model", "tokenizer-path", "kt-weight-path", "init-expert-location")
SIMULATOR_MODULE = "tuner.sim"


@dataclass(frozen=True)
class Profile:
    """The flags to deploy, what was left out of the measured flags and why, and the flags
    whose values are stand-ins to replace (paths of a simulated study)."""

    flags: dict[str, Any]
    dropped: dict[str, str] = field(default_factory=dict)
    placeholders: tuple[str, ...] = ()
    # Tuned environment variables of the server: a --config file cannot carry them.
    env: dict[str, str] = field(default_factory=dict)


def recorded_flags(trial: FrozenTrial) -> dict[str, Any]:
    flags = trial.user_attrs.get(ATTR_FLAGS)
    if not isinstance(flags, Mapping):
        raise ConfigError(f"--trial: trial {trial.number} has no recorded launch flags; pick a launched trial")
    return dict(flags)


def servable_profile(trial: FrozenTrial, *, simulated: bool, keep_benchmark_flags: bool = False,
                     secrets: tuple[str, ...] = ()) -> Profile:
    """What `sglang.launch_server --config` should get from `trial`: its launch flags without
    the deployment's own (host, port), the simulator's, and, unless kept, the benchmark-only
    switches. `simulated`: the study ran on the simulator, so model paths are stand-ins.
    `secrets` (the space's secret flags) are never written: kttune stored only placeholders
    for them, and a profile is shared; the header says to pass them on the command line,
    which sglang merges with --config."""
    flags: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    recorded, env = split_env(recorded_flags(trial))
    for key, value in recorded.items():
        if key in RESERVED_FLAGS:  # the deployment gives host and port
            continue
        if key in secrets:
            dropped[key] = f"a secret: pass --{key} VALUE on the command line"
        elif key.startswith(SIMULATOR_PREFIX):
            dropped[key] = "the simulator's own flag"
        elif key in BENCHMARK_ONLY_FLAGS and not keep_benchmark_flags:
            dropped[key] = "benchmark hygiene only; --keep-bench-flags keeps it"
        else:
            flags[key] = value
    placeholders = tuple(k for k in PATH_FLAGS if k in flags) if simulated else ()
    return Profile(flags, dropped, placeholders, env)


def render_profile(trial: FrozenTrial, profile: Profile, *, study_name: str, objectives: list[str],
                   measured: str = "", now: _dt.datetime | None = None) -> str:
    """The profile as YAML with a short header: provenance, what was measured (`measured`:
    one line on repeats, if any), what was left out, which values are stand-ins."""
    metrics = metrics_of(trial)
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds")
    command = "python -m sglang.launch_server --config THIS_FILE --host HOST --port PORT"
    lines = [f"# kttune profile: {command}", f"# study: {study_name}", f"# trial: {trial.number}",
             f"# exported: {stamp}"]
    if profile.env:
        lines.append("# environment variables it was measured with (a --config file cannot set them):")
        lines += [f"#   {name}={shlex.quote(value)}" for name, value in profile.env.items()]
        assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in profile.env.items())
        lines.append(f"# launch with: {assignments} {command}")
    if measured:
        lines.append(f"# measured: {measured}")
    for key in objectives:
        if key in metrics:
            lines.append(f"# {key}: {metrics[key]:.4g}")
    for key in sorted(metrics):
        workload, _, metric = key.rpartition(".")
        # the early-stop probe is the tuner's own short run; a 1-token workload has no ITL
        if key in objectives or workload.endswith(PROBE_SUFFIX) or not metrics[key]:
            continue
        if metric in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms"):
            lines.append(f"# {key}: {metrics[key]:.4g}")
    for key, why in profile.dropped.items():
        lines.append(f"# left out: {key} ({why})")
    if profile.placeholders:
        lines.append("# measured on the simulator: the values marked PLACEHOLDER are its stand-ins; "
                     "set your model's paths before launching")
    body = []
    for line in yaml.safe_dump(profile.flags, sort_keys=False, default_flow_style=False).splitlines():
        key = line.split(":", 1)[0]
        body.append(f"{line}  # PLACEHOLDER: the simulator's stand-in" if key in profile.placeholders else line)
    return "\n".join(lines + body) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so no half-written file remains."""
    parent = path.parent if str(path.parent) else Path(".")
    check_out_file(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as `open` would create it: the server's user may need to read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
