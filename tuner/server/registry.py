"""The host's list of servers kttune started and has not torn down yet, one JSON file per
launch in a per-user runtime folder (KTTUNE_RUNTIME_DIR, default ``$XDG_RUNTIME_DIR/kttune``
or ``/tmp/kttune-<uid>``).

Each entry is a copy of the launch's pid file (PID, start time, launch token, the tuner that
owns it and that tuner's start time) plus where that pid file lives. Teardown removes the
entry with the pid file. An entry whose owner is gone while its processes live is a leftover
(tuner.server.leftovers): every command that opens a study reports them, `kttune run` reaps
them. Only kttune's own launches are ever listed, so only they are ever killed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RUNTIME_ENV = "KTTUNE_RUNTIME_DIR"


def runtime_dir() -> Path:
    """This user's registry folder (not created here)."""
    explicit = os.environ.get(RUNTIME_ENV, "").strip()
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "kttune"
    return Path(f"/tmp/kttune-{os.getuid()}")


def _entry(token: str) -> Path:
    return runtime_dir() / "servers" / f"{token}.json"


def register(payload: Mapping[str, Any], pid_file: Path) -> None:
    """List a launch (its pid-file payload, which must hold ``token``). A folder that cannot
    be written costs only the host-wide leftover search, never the launch."""
    path = _entry(str(payload["token"]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**payload, "pid_file": str(pid_file)}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def unregister(token: str) -> None:
    try:
        _entry(token).unlink()
    except (OSError, ValueError):
        pass


def entries() -> Iterator[tuple[Path, dict[str, Any]]]:
    """(entry file, payload) of every listed launch of this user; unreadable files are skipped."""
    folder = runtime_dir() / "servers"
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError:
        return
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "token" in data and "pid" in data:
            yield path, data
