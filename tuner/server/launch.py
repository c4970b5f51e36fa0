"""Start a server process (real ``sglang.launch_server`` or ``tuner.sim``) in its own session.

The process gets its own session and process group, runs under the watchdog
(tuner.server.watchdog: it dies with the tuner and takes the tree with it), logs to a file
(never an undrained pipe), and carries a per-launch token in its environment so that
teardown and ``kill_orphan`` can find descendants that left the group or lost their parent.
A JSON pid file beside the log lets a later tuner kill an orphaned tree.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tuner.errors import ConfigError, ServerLaunchError
from tuner.machine import used_bytes_total
from tuner.server import registry
from tuner.server.watchdog import die_with_tuner

TOKEN_ENV = "KTTUNE_SERVER_TOKEN"
PID_FILE_NAME = "server.pid"
# Default environment for the server; the caller's env wins. Unbuffered output keeps
# the log current, which readiness scanning depends on.
_DEFAULT_ENV = {"PYTHONUNBUFFERED": "1"}
_PORT_FLOOR = 20000


@dataclass(frozen=True)
class ServerHandle:
    """A launched server. ``pgid`` and ``sid`` equal ``pid`` (new session).

    ``started_at`` is wall-clock (``time.time()``), ``started_monotonic`` the same
    instant on the monotonic clock. ``log_offset`` is the log size before launch: the
    log is opened for append, and scanning starts there.
    """

    proc: subprocess.Popen[bytes]
    pid: int
    host: str
    port: int
    log_path: Path
    argv: tuple[str, ...]
    started_at: float
    started_monotonic: float
    create_time: float
    token: str
    log_offset: int
    pid_file: Path
    baseline_gpu_used: int | None = None
    # The server's CUDA_VISIBLE_DEVICES (None: unset, every GPU): teardown watches those only.
    visible_devices: str | None = None

    @property
    def pgid(self) -> int:
        return self.pid

    @property
    def base_url(self) -> str:
        """``http://host:port`` suitable for a client on this machine."""
        host = client_host(self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def client_host(host: str) -> str:
    """The address a local client should dial for a server bound on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def port_is_free(host: str, port: int) -> bool:
    """True if a listening socket could bind ``host:port`` now (SO_REUSEADDR, as uvicorn).

    TIME_WAIT leftovers therefore count as free; a live listener on the same or the
    wildcard address does not.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, socktype, proto, _, addr in infos:
        with socket.socket(family, socktype, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError:
                return False
    return True


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, chosen below the kernel's ephemeral range.

    SGLang binds its HTTP port only after loading the model (minutes); an ephemeral
    port could meanwhile be taken as the source port of some outgoing connection.
    Falls back to a kernel-assigned port when no candidate below the range is free.
    """
    high = _ephemeral_low()
    rng = random.Random()
    if high - _PORT_FLOOR >= 100:
        for _ in range(200):
            port = rng.randrange(_PORT_FLOOR, high)
            if port_is_free(host, port):
                return port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _write_pid_file(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def start_server(
    argv: Sequence[str],
    *,
    log_path: Path,
    host: str,
    port: int,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check_port: bool = True,
    recorded_argv: Sequence[str] | None = None,
) -> ServerHandle:
    """Launch ``argv`` in a new session, output appended to ``log_path``.

    ``env`` is layered over ``os.environ`` (plus PYTHONUNBUFFERED=1 unless given).
    ``host``/``port`` are where the server will listen (they must match the flags in
    ``argv``); with ``check_port`` a busy port fails fast with reason ``port_in_use``
    instead of after a full model load. ``recorded_argv`` is the argv the pid file shows
    (``argv`` with secrets redacted); default ``argv``. Raises ServerLaunchError(reason="exec_failed")
    when the executable cannot be started. The caller must eventually call stop_server.
    """
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"argv must be a non-empty sequence of strings, got {argv!r}")
    if check_port and not port_is_free(host, port):
        raise ServerLaunchError(f"port {host}:{port} is already in use before launch", reason="port_in_use")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    child_env = {**os.environ, **_DEFAULT_ENV, **(env or {}), TOKEN_ENV: token}
    visible = child_env.get("CUDA_VISIBLE_DEVICES")
    baseline = used_bytes_total(visible)
    argv_t = tuple(argv)
    with open(log_path, "ab") as log:
        log_offset = log.tell()
        started_at, started_mono = time.time(), time.monotonic()
        if shutil.which(argv_t[0]) is None:
            raise ServerLaunchError(f"cannot start {argv_t[0]!r}: not found or not executable", reason="exec_failed")
        try:
            proc = subprocess.Popen(
                die_with_tuner(argv_t),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
                env=child_env,
            )
        except OSError as exc:
            raise ServerLaunchError(f"cannot start {argv_t[0]!r}: {exc}", reason="exec_failed") from exc
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # already gone; keep a value that still identifies "this launch"
        create_time = started_at
    pid_file = log_path.parent / PID_FILE_NAME
    handle = ServerHandle(
        proc=proc,
        pid=proc.pid,
        host=host,
        port=port,
        log_path=log_path,
        argv=argv_t,
        started_at=started_at,
        started_monotonic=started_mono,
        create_time=create_time,
        token=token,
        log_offset=log_offset,
        pid_file=pid_file,
        baseline_gpu_used=baseline,
        visible_devices=visible,
    )
    payload: dict[str, object] = {
        "pid": proc.pid,
        "pgid": proc.pid,
        "sid": proc.pid,
        "create_time": create_time,
        "token": token,
        "argv": list(recorded_argv if recorded_argv is not None else argv_t),
        "host": host,
        "port": port,
        "log_path": str(log_path),
        "started_at": started_at,
        "visible_devices": visible,
        # The tuner that owns the tree: once it is gone, a live tree is a leftover.
        "owner_pid": os.getpid(),
        "owner_create_time": psutil.Process().create_time(),
    }
    _write_pid_file(pid_file, payload)
    registry.register(payload, pid_file)
    return handle

