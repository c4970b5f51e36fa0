"""A written launch profile, read by the server that will get it: its own ``--config`` merger and
argument parser (:mod:`tuner.preflight.parser_probe` in ``server.python``; for a simulated space
the simulator's parser of its dialect), before `kttune export` reports success."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuner.errors import ConfigError
from tuner.preflight.dialect import PARSER_TAG, PROBE_FILE, ServerDialect, _python, _run, _tagged, detect_dialect

_FLAG = re.compile(r"--[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class ProfileVerdict:
    """Who read the profile (``checked_by``) or, where nobody could, why not (``skipped``)."""

    checked_by: str | None
    skipped: str | None = None


def _refused_key(error: str, profile: Mapping[str, Any]) -> str | None:
    """The profile key a parser's refusal names (``unrecognized arguments: --x 3``, ``argument
    --x: invalid choice``), in the spelling of the file."""
    by_flag = {f"--{k}": k for k in profile} | {f"--{str(k).replace('_', '-')}": k for k in profile}
    for flag in _FLAG.findall(error):
        if flag in by_flag:
            return str(by_flag[flag])
    return None


def check_profile(space: Any, path: Path, *, dialect: ServerDialect | None = None,
                  timeout_s: float = 600.0) -> ProfileVerdict:
    """Merge and parse ``--config path`` as the space's server would. Raises ConfigError naming the
    key it refuses; returns who checked it, or why no parser could (no sglang in server.python,
    or its parser cannot be built there)."""
    dialect = dialect or detect_dialect(space)
    if dialect.simulated:
        argv = [*space.server.launcher(), "check-config", str(path), "--sim-dialect", dialect.name]
    elif dialect.name == "unknown":
        return ProfileVerdict(None, f"{dialect.python} has no sglang: the profile was not parsed by a server")
    else:
        argv = [_python(space), str(PROBE_FILE), "check-config", str(path)]
    res = _run(argv, space.server.env, timeout_s)
    data = _tagged(res.stdout, PARSER_TAG) if res is not None else None
    if data is None or "ok" not in data:
        why = (data or {}).get("error") or ("timed out or could not run" if res is None else f"exited {res.returncode}")
        return ProfileVerdict(None, f"{dialect.describe()} could not build its parser ({why})")
    if data["ok"]:
        return ProfileVerdict(f"{dialect.describe()}'s --config merger and argument parser")
    error = str(data.get("error") or "refused")
    profile = yaml.safe_load(path.read_text()) or {}
    key = _refused_key(error, profile if isinstance(profile, Mapping) else {})
    where = f"profile key {key!r}" if key else "the profile"
    raise ConfigError(f"export: {dialect.describe()} refuses {where}: {error.splitlines()[0][:300]}; "
                      "fix the space (or --keep-bench-flags) and export again")
