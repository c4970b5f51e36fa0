"""Export a trial as a launch profile that `sglang.launch_server --config FILE` accepts as-is.

SGLang's config parser wants a flat mapping of dashed flag names; store_true switches as
booleans, lists for multi-value flags, scalars otherwise. Provenance goes in comments.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial

from tuner.errors import ConfigError
from tuner.storage import ATTR_FLAGS, metrics_of


def profile_flags(trial: FrozenTrial) -> dict[str, Any]:
    flags = trial.user_attrs.get(ATTR_FLAGS)
    if not isinstance(flags, Mapping):
        raise ConfigError(f"--trial: trial {trial.number} has no recorded launch flags; pick a launched trial")
    return {k: v for k, v in flags.items() if k not in ("host", "port")}


def render_profile(trial: FrozenTrial, *, study_name: str, objectives: list[str], now: _dt.datetime | None = None) -> str:
    flags = profile_flags(trial)
    metrics = metrics_of(trial)
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds")
    lines = ["# kttune profile: python -m sglang.launch_server --config THIS_FILE",
             f"# study: {study_name}", f"# trial: {trial.number}", f"# exported: {stamp}"]
    for key in objectives:
        if key in metrics:
            lines.append(f"# {key}: {metrics[key]:.4g}")
    for key in sorted(metrics):
        if key not in objectives and key.rsplit(".", 1)[-1] in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms"):
            lines.append(f"# {key}: {metrics[key]:.4g}")
    body = yaml.safe_dump(flags, sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n" + body


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so no half-written file remains."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--out: folder {parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; give a file name such as best.yaml")
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out: {path} must end in .yaml or .yml (sglang's --config requires it)")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
