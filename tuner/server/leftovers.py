"""Server trees that a kttune process left behind when it died, found through the host's
registry (tuner.server.registry): reported by every command that opens a study, reaped by
`kttune run` of any study.

An entry is a leftover when its owner (the tuner that launched it, by PID and start time) is
gone and a process of its tree (the recorded PID with its start time, its group or session,
or a process carrying its launch token) still lives. Trees of live tuners — other runs on this
host — are never touched; entries whose trees are gone are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tuner.log import Log
from tuner.server import registry
from tuner.server.teardown import kill_orphan, live_tree

_CREATE_TOL_S = 0.05


@dataclass(frozen=True)
class Leftover:
    """One orphaned tree: its watchdog/launcher PID, the live PIDs, and where its files are."""

    pid: int
    pids: tuple[int, ...]
    pid_file: Path
    entry: Path
    log_path: str
    owner_pid: int | None
    started_at: float | None

    def describe(self) -> str:
        return (f"pid {self.pid} ({len(self.pids)} process(es): {', '.join(map(str, self.pids))}; "
                f"log {self.log_path or '?'})")


def _owner_alive(data: dict[str, Any]) -> bool:
    pid, created = data.get("owner_pid"), data.get("owner_create_time")
    if not isinstance(pid, int):
        return False  # written before owners were recorded: only its tree's liveness counts
    try:
        proc = psutil.Process(pid)
        return not isinstance(created, (int, float)) or abs(proc.create_time() - float(created)) <= _CREATE_TOL_S
    except psutil.Error:
        return False


def find_leftovers() -> list[Leftover]:
    """Trees of dead kttune processes still running on this host (this user's)."""
    out: list[Leftover] = []
    for entry, data in registry.entries():
        if _owner_alive(data):
            continue
        pids = live_tree(data)
        if not pids:
            registry.unregister(str(data["token"]))  # the tree is gone: nothing to report
            continue
        started = data.get("started_at")
        out.append(Leftover(pid=int(data["pid"]), pids=tuple(pids), pid_file=Path(str(data.get("pid_file", entry))),
                            entry=entry, log_path=str(data.get("log_path", "")),
                            owner_pid=data.get("owner_pid") if isinstance(data.get("owner_pid"), int) else None,
                            started_at=float(started) if isinstance(started, (int, float)) else None))
    return out


def leftover_note(found: list[Leftover]) -> str | None:
    """One line about the leftovers a read-only command saw, or None."""
    if not found:
        return None
    trees = "; ".join(f.describe() for f in found)
    return (f"{len(found)} server tree(s) left running by a kttune that is gone: {trees}; "
            "`kttune run` (of any study) stops them")


def reap_leftovers(log: Log, *, gpu_timeout_s: float = 120.0) -> int:
    """Stop every leftover tree (TERM, KILL, wait for its GPU memory); returns how many.
    Raises TeardownError when one survives SIGKILL or keeps its GPU memory."""
    reaped = 0
    for found in find_leftovers():
        source = found.pid_file if found.pid_file.exists() else found.entry
        if kill_orphan(source, gpu_timeout_s=gpu_timeout_s):
            reaped += 1
            log(f"stopped a server tree a dead kttune left behind: {found.describe()}")
        registry.unregister(found.entry.stem)
    return reaped
