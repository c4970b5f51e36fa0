"""Field-level checks shared by the section parsers: the error shape ("where: problem; fix"),
allowed keys, mappings, numbers, launch-flag names and interpreter paths."""
from __future__ import annotations

import json
import math
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


# The largest count any field takes: what a C int holds (sglang's, the kernels', numpy's).
MAX_COUNT = 2**31 - 1


def number(where: str, value: Any, *, integer: bool = False, positive: bool = False) -> float:
    """A number of the space: finite (YAML's .nan and .inf are numbers to PyYAML), an integer
    within MAX_COUNT where one is needed, positive where asked."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise fail(where, f"must be {kind}, got {value!r}", f"set it to {kind}")
    if not math.isfinite(value):
        raise fail(where, f"must be a finite number, got {value!r}", "write a number")
    if integer and abs(value) > MAX_COUNT:
        raise fail(where, f"{value} is larger than any machine or client takes (at most {MAX_COUNT})", "use a real count")
    if positive and value <= 0:
        raise fail(where, f"must be > 0, got {value!r}", "use a positive value")
    return value


def flag_name(where: str, key: Any) -> str:
    if not isinstance(key, str) or not key or key.startswith("-") or "_" in key:
        raise fail(where, f"bad flag name {key!r}", "write launch flags without leading dashes, with dashes not underscores (e.g. kt-num-gpu-experts)")
    if key in RESERVED_FLAGS:
        raise fail(f"{where}.{key}", "is set by kttune for every trial", "remove it (use server.host / server.port)")
    if key == "config":  # sglang merges the file's flags under the command line's, unseen by kttune
        raise fail(f"{where}.{key}", "would set flags kttune neither checks nor records",
                   "move the file's flags into server.args (or params)")
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


def env_mapping(where: str, value: Any) -> dict[str, str]:
    """Environment variables for a child process: names a shell accepts, values that are text
    (numbers are written as text); a list, a mapping, null or a bool would reach the child as
    Python's rendering of it ("None", "True", "[1, 2]")."""
    out: dict[str, str] = {}
    for key, raw in mapping(where, value).items():
        name = str(key)
        if not name or "=" in name or "\0" in name or name[0].isdigit() or not name.replace("_", "a").isalnum():
            raise fail(f"{where}.{name}", "is not an environment variable name", "use letters, digits and _ only")
        if isinstance(raw, bool) or raw is None or not isinstance(raw, (str, int, float)):
            raise fail(f"{where}.{name}", f"must be text, got {raw!r}", "quote the value, e.g. \"1\" or \"true\"")
        out[name] = str(raw)
    return out


# Enough of a dataset file to see its first conversation without reading a 600 MB file whole.
_DATASET_HEAD = 1 << 20


def check_dataset(where: str, path: Path, note: str = "") -> None:
    """A file the bench client can sample prompts from (ShareGPT's shape: a JSON list of
    records whose `conversations` hold turns with a `value`), checked on its first record
    before any launch: otherwise every launch fails in the client with a traceback."""
    fix = "point it at a ShareGPT-format JSON file (a list of {conversations: [{from, value}, ...]})"
    if not path.exists():
        raise fail(where, f"{path} does not exist{note}", fix)
    if not path.is_file():
        raise fail(where, f"{path} is a folder, not a file", fix)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_DATASET_HEAD).decode("utf-8", errors="replace")
    except OSError as exc:
        raise fail(where, f"cannot read {path} ({exc.strerror})", "make it readable") from None
    text = head.lstrip()
    if not text.startswith("["):
        raise fail(where, f"{path} is not a JSON list", fix)
    if len(head) < _DATASET_HEAD:  # read whole: the client json.loads all of it
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise fail(where, f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", fix) from None
    body = text[1:].lstrip()
    if body.startswith("]"):
        raise fail(where, f"{path} is an empty list: the client has no prompt to send", fix)
    try:
        first, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return  # a first record longer than the head: the client will judge it
    turns = first.get("conversations", first.get("conversation")) if isinstance(first, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "value" in t for t in turns):
        raise fail(where, f"{path}: its first record has no conversations with a value per turn, got {str(first)[:80]}",
                   fix)
