"""Stop a server tree for good: signals, port, GPU memory, /dev/shm.

The tree is every process that is a descendant of the launcher, shares its process
group or session, or carries the launch token in its environment (which finds
descendants that called setsid and lost their parent). TERM goes to the group and to
the strays, KILL to survivors; then the port must be free and, with NVML, the tree's
PIDs gone from the GPU and used memory back near the pre-launch baseline.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from tuner.errors import TeardownError
from tuner.machine import GpuInfo, NvmlSession
from tuner.server import registry
from tuner.server.launch import TOKEN_ENV, ServerHandle, port_is_free
from tuner.server.shm import kt_shm_paths, orphan_shm_files, remove_files

_POLL_S = 0.05
_CREATE_TOL_S = 0.05


class GpuMonitor(Protocol):
    """What teardown needs from the GPU side; ``tuner.machine.NvmlSession`` implements it.
    ``indices`` are NVML indices (None: every device); ``visible`` maps a server's
    ``CUDA_VISIBLE_DEVICES`` onto them (tuner.machine.visible_indices)."""

    def probe_gpus(self) -> list[GpuInfo]: ...

    def gpu_processes(self, indices: Sequence[int] | None = None) -> dict[int, int]: ...

    def used_bytes_total(self, indices: Sequence[int] | None = None) -> int | None: ...

    def visible(self, spec: str | None) -> list[int] | None: ...


@dataclass(frozen=True)
class TeardownReport:
    """What stop_server did. ``killed_pids`` needed SIGKILL; ``leftover_pids`` were
    still alive at the end; ``gpu_released`` is None when no GPU could be watched;
    ``port_released`` is False when the port is still taken (by a stranger: no error)."""

    duration_s: float
    signals_sent: tuple[str, ...]
    killed_pids: tuple[int, ...]
    leftover_pids: tuple[int, ...]
    gpu_released: bool | None
    tree_pids: tuple[int, ...] = ()
    port_released: bool = True
    returncode: int | None = None
    shm_removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class _TreeSpec:
    root_pid: int
    pgid: int
    sid: int
    token: str
    create_time: float


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _protected_pids() -> set[int]:
    """This process and its ancestors: never signal them, whatever they share."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _collect(spec: _TreeSpec, seeds: list[psutil.Process]) -> dict[int, psutil.Process]:
    """Live (non-zombie) members of the tree, keyed by PID.

    Group and session ids count only while they cannot have been reused: the root is
    still the recorded process, or no process holds that id as its PID.
    """
    found: dict[int, psutil.Process] = {}
    protected = _protected_pids()
    uid = os.getuid()
    group_ok = True
    try:
        root = psutil.Process(spec.root_pid)
        if abs(root.create_time() - spec.create_time) <= _CREATE_TOL_S:
            seeds = [root, *seeds]
        elif spec.root_pid in (spec.pgid, spec.sid):
            group_ok = False  # the PID (hence the group id) now belongs to someone else
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        if p.pid in protected:
            continue
        try:
            if p.create_time() + _CREATE_TOL_S < spec.create_time or p.uids().real != uid:
                continue  # older than the launch, or another user's: cannot be ours
            if group_ok and (os.getpgid(p.pid) == spec.pgid or os.getsid(p.pid) == spec.sid):
                found[p.pid] = p
            elif p.environ().get(TOKEN_ENV) == spec.token:
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    for p in [*seeds, *found.values()]:
        try:
            members = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for m in members:
            if m.pid not in protected:
                found.setdefault(m.pid, m)
    return {pid: p for pid, p in found.items() if _alive(p)}


def _in_group(pgid: int, procs: dict[int, psutil.Process]) -> bool:
    for pid in procs:
        try:
            if os.getpgid(pid) == pgid:
                return True
        except OSError:
            continue
    return False


def _signal_all(spec: _TreeSpec, procs: dict[int, psutil.Process], sig: signal.Signals, sent: list[str]) -> None:
    if _in_group(spec.pgid, procs):
        try:
            os.killpg(spec.pgid, sig)
            sent.append(f"{sig.name}:pg{spec.pgid}")
        except OSError:
            pass
    for pid, p in procs.items():
        try:
            if os.getpgid(pid) == spec.pgid:
                continue
            p.send_signal(sig)  # psutil refuses if the PID was reused
            sent.append(f"{sig.name}:{pid}")
        except (psutil.Error, OSError):
            continue


def _wait_gone(
    procs: dict[int, psutil.Process], popen: subprocess.Popen[bytes] | None, timeout_s: float
) -> dict[int, psutil.Process]:
    """Wait until every process exits (zombies count as gone); return the survivors."""
    deadline = time.monotonic() + timeout_s
    while True:
        if popen is not None:
            popen.poll()  # reap our own child so it does not linger as a zombie
        alive = {pid: p for pid, p in procs.items() if _alive(p)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)


def _terminate(
    spec: _TreeSpec,
    popen: subprocess.Popen[bytes] | None,
    term_timeout_s: float,
    kill_timeout_s: float,
) -> tuple[list[str], list[int], dict[int, psutil.Process], set[int], set[Path]]:
    """TERM then KILL the tree. Returns (signals, killed PIDs, leftover processes,
    tree PIDs, shm files)."""
    sent: list[str] = []
    procs = _collect(spec, [])
    tree_pids = set(procs)
    shm: set[Path] = set()
    for pid in procs:
        shm |= kt_shm_paths(pid)
    if not procs:
        return sent, [], {}, tree_pids, shm
    _signal_all(spec, procs, signal.SIGTERM, sent)
    survivors = _wait_gone(procs, popen, term_timeout_s)
    # Re-collect: members may have forked meanwhile; seed with the survivors' subtrees.
    procs = _collect(spec, list(survivors.values()))
    tree_pids |= set(procs)
    killed = sorted(procs)
    if procs:
        _signal_all(spec, procs, signal.SIGKILL, sent)
    leftover = _wait_gone(procs, popen, kill_timeout_s)
    return sent, killed, leftover, tree_pids, shm


def _port_holders(port: int) -> set[int | None]:
    """PIDs listening on ``port`` (None where the kernel does not tell us whose)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return {None}
    return {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def _is_ours(pid: int, tree_pids: set[int], since: float) -> bool:
    """A listener counts as the tree's if it was in it, or is this user's and newer than
    the launch (an escaped descendant); anything else is a stranger on the port."""
    if pid in tree_pids:
        return True
    try:
        p = psutil.Process(pid)
        return p.uids().real == os.getuid() and p.create_time() + _CREATE_TOL_S >= since
    except psutil.Error:
        return False


def _wait_port(host: str, port: int, tree_pids: set[int], since: float, timeout_s: float) -> tuple[bool, str]:
    """Wait until ``port`` is free. Returns (released, problem); a stranger holding the
    port (e.g. the cause of a ``port_in_use`` failure) ends the wait without a problem."""
    deadline = time.monotonic() + timeout_s
    while not port_is_free(host, port):
        holders = _port_holders(port)
        ours = sorted(pid for pid in holders if pid is not None and _is_ours(pid, tree_pids, since))
        if holders and None not in holders and not ours:
            return False, ""
        if time.monotonic() >= deadline:
            if ours:
                return False, f"port {host}:{port} still held by PIDs {ours} after {timeout_s:.0f} s"
            return False, ""
        time.sleep(0.2)
    return True, ""


def _wait_gpu(
    gpu: GpuMonitor,
    tree_pids: set[int],
    baseline: int | None,
    tolerance_per_gpu: int,
    timeout_s: float,
    visible_devices: str | None = None,
) -> tuple[bool | None, str]:
    """Poll until no tree PID holds memory on the server's GPUs and their usage is back near
    ``baseline``. Only the devices ``visible_devices`` (the server's CUDA_VISIBLE_DEVICES)
    selects are watched: a neighbour's server on other GPUs of the host holds nothing up."""
    devices = gpu.visible(visible_devices)
    n_gpus = len(gpu.probe_gpus()) if devices is None else len(devices)
    if n_gpus == 0:
        return None, ""
    limit = None if baseline is None else baseline + tolerance_per_gpu * n_gpus
    deadline = time.monotonic() + timeout_s
    where = "" if devices is None else f" {devices}"
    while True:
        stuck = sorted(pid for pid in gpu.gpu_processes(devices) if pid in tree_pids)
        used = gpu.used_bytes_total(devices)
        over = limit is not None and used is not None and used > limit
        if not stuck and not over:
            return True, ""
        if time.monotonic() >= deadline:
            detail = f"GPU{where} not released after {timeout_s:.0f} s: tree PIDs still on GPU {stuck}"
            if over and used is not None and baseline is not None:
                detail += f"; used {used / 2**30:.2f} GiB vs baseline {baseline / 2**30:.2f} GiB"
            return False, detail
        time.sleep(0.25)


def _remove_pid_file(path: Path, token: str) -> None:
    """Remove the pid file unless a later launch has since overwritten it, and the launch's
    entry in the host's registry."""
    registry.unregister(token)
    try:
        if json.loads(path.read_text()).get("token") in (token, None):
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def stop_server(
    handle: ServerHandle,
    *,
    term_timeout_s: float = 20.0,
    kill_timeout_s: float = 10.0,
    port_timeout_s: float = 30.0,
    gpu_timeout_s: float = 120.0,
    baseline_gpu_used: int | None = None,
    gpu_tolerance_bytes: int = 1 << 30,
    gpu: GpuMonitor | None = None,
) -> TeardownReport:
    """Stop the whole tree and wait until its port and GPU memory are released.

    ``baseline_gpu_used`` defaults to the value recorded at launch; ``gpu_tolerance_bytes``
    is allowed per GPU above it. ``gpu`` defaults to an NVML session. Idempotent.
    Raises TeardownError (with ``.report``) when processes survive SIGKILL, a process
    of the tree (or this user's, newer than the launch) keeps the port, or the GPU is
    not released in time. A port held by an older or foreign process is only reported.
    """
    t0 = time.monotonic()
    spec = _TreeSpec(handle.pid, handle.pgid, handle.pid, handle.token, handle.create_time)
    sent, killed, survivors, tree_pids, shm = _terminate(spec, handle.proc, term_timeout_s, kill_timeout_s)
    try:
        returncode: int | None = handle.proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        returncode = None
    problems: list[str] = []
    port_released, detail = _wait_port(handle.host, handle.port, tree_pids, handle.create_time, port_timeout_s)
    if detail:
        problems.append(detail)
    baseline = baseline_gpu_used if baseline_gpu_used is not None else handle.baseline_gpu_used
    if gpu is None:
        with NvmlSession() as session:
            released, detail = _wait_gpu(session, tree_pids, baseline, gpu_tolerance_bytes, gpu_timeout_s,
                                         handle.visible_devices)
    else:
        released, detail = _wait_gpu(gpu, tree_pids, baseline, gpu_tolerance_bytes, gpu_timeout_s,
                                     handle.visible_devices)
    if detail:
        problems.append(detail)
    leftover = sorted(pid for pid, p in survivors.items() if _alive(p))
    if leftover:
        problems.append(f"processes survived SIGKILL: {leftover}")
    shm_removed = remove_files(shm | orphan_shm_files(handle.started_at))
    report = TeardownReport(
        duration_s=time.monotonic() - t0,
        signals_sent=tuple(sent),
        killed_pids=tuple(killed),
        leftover_pids=tuple(leftover),
        gpu_released=released,
        tree_pids=tuple(sorted(tree_pids)),
        port_released=port_released,
        returncode=returncode,
        shm_removed=shm_removed,
    )
    if not leftover:
        _remove_pid_file(handle.pid_file, handle.token)
    if problems:
        err = TeardownError(f"teardown of server pid {handle.pid} incomplete: " + "; ".join(problems))
        err.report = report
        raise err
    return report


def _spec_of(data: Mapping[str, Any]) -> _TreeSpec:
    """The tree a pid file describes (raises KeyError, ValueError or TypeError if malformed)."""
    pid = int(data["pid"])
    return _TreeSpec(root_pid=pid, pgid=int(data.get("pgid", pid)), sid=int(data.get("sid", pid)),
                     token=str(data.get("token", "")) or "\0", create_time=float(data["create_time"]))


def live_tree(data: Mapping[str, Any]) -> list[int]:
    """PIDs of the tree a pid-file payload describes that are still alive (signals nothing);
    [] for a malformed payload."""
    try:
        spec = _spec_of(data)
    except (KeyError, ValueError, TypeError):
        return []
    return sorted(_collect(spec, []))


def kill_orphan(
    pid_file: Path,
    *,
    term_timeout_s: float = 10.0,
    kill_timeout_s: float = 10.0,
    gpu_timeout_s: float = 120.0,
    gpu: GpuMonitor | None = None,
) -> bool:
    """Kill a tree left behind by an earlier tuner, from its ``server.pid`` file.

    The PID counts as that server only if its psutil create_time matches the recorded
    one; group, session and launch-token members created after it count too. Returns
    True if any process was signalled. Removes the pid file once nothing survives.
    Like stop_server, waits (``gpu_timeout_s``) until no PID of the tree holds GPU
    memory, so the next launch does not start into an OOM; raises TeardownError naming
    the PIDs when processes survive SIGKILL or the GPU is not released in time.
    """
    try:
        data = json.loads(Path(pid_file).read_text())
        spec = _spec_of(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    visible = data.get("visible_devices") if isinstance(data.get("visible_devices"), str) else None
    pid = spec.root_pid
    sent, _, leftover, tree_pids, shm = _terminate(spec, None, term_timeout_s, kill_timeout_s)
    remove_files(shm)
    problems = []
    if sent:
        if gpu is None:
            with NvmlSession() as session:
                _, detail = _wait_gpu(session, tree_pids, None, 0, gpu_timeout_s, visible)
        else:
            _, detail = _wait_gpu(gpu, tree_pids, None, 0, gpu_timeout_s, visible)
        if detail:
            problems.append(detail)
    if leftover:
        problems.append(f"processes survived SIGKILL: {sorted(leftover)}")
    else:
        _remove_pid_file(Path(pid_file), spec.token)
    if problems:
        raise TeardownError(f"orphaned server pid {pid} ({pid_file}) could not be cleared: " + "; ".join(problems))
    return bool(sent)
