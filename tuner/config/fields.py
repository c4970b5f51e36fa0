"""Field-level checks shared by the section parsers: the error shape ("where: problem; fix"),
allowed keys, mappings, numbers, launch-flag names and interpreter paths."""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError

# kttune sets these per trial; a space must not fix or tune them.
# Set by kttune for every trial (and by the deployment, not a profile).
RESERVED_FLAGS = frozenset({"host", "port"})


def fail(where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}; {fix}")


def check_keys(where: str, data: Mapping[str, Any], allowed: set[str], required: frozenset[str] | set[str] = frozenset()) -> None:
    for key in data:
        if key not in allowed:
            raise fail(f"{where}.{key}", "unknown key", f"use one of: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in data:
            raise fail(f"{where}.{key}", "missing", "add it")


def mapping(where: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail(where, f"must be a mapping, got {type(value).__name__}", "write it as `key: value` lines")
    return value


def number(where: str, value: Any, *, integer: bool = False, positive: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise fail(where, f"must be {kind}, got {value!r}", f"set it to {kind}")
    if positive and value <= 0:
        raise fail(where, f"must be > 0, got {value!r}", "use a positive value")
    return value


def flag_name(where: str, key: Any) -> str:
    if not isinstance(key, str) or not key or key.startswith("-") or "_" in key:
        raise fail(where, f"bad flag name {key!r}", "write launch flags without leading dashes, with dashes not underscores (e.g. kt-num-gpu-experts)")
    if key in RESERVED_FLAGS:
        raise fail(f"{where}.{key}", "is set by kttune for every trial", "remove it (use server.host / server.port)")
    return key


def resolve_python(where: str, value: Any, base: Path, check: bool = True) -> str:
    if value is None:
        return sys.executable
    if not isinstance(value, str) or not value:
        raise fail(where, f"must be a path to a Python interpreter, got {value!r}", "set it or remove it to use the current one")
    found = shutil.which(value) if os.sep not in value else None
    path = Path(found) if found else Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = (base / path)
    if check and not (path.is_file() and os.access(path, os.X_OK)):
        raise fail(where, f"interpreter {value!r} not found or not executable{relative_note(value, base)}",
                   "point it at the python of the environment that has sglang installed")
    return str(path)



def relative_note(value: str, base: Path) -> str:
    """For a path that was not found: the folder a relative one was read from (the current
    directory, not the space file's folder), so the user knows what it was relative to."""
    if os.path.isabs(os.path.expanduser(value)) or os.sep not in value and shutil.which(value):
        return ""
    return f" (a relative path, read from the current directory {base}, not from the space file's folder)"
