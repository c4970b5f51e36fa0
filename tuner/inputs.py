"""Checks of what the command line and the environment give kttune, before anything is
opened, written or started: study names, storage URLs, folders, seeds, ports, and the
KTTUNE_* variables. Each mistake is a ConfigError naming the argument or variable and the fix
(exit 2); the space file's own fields are checked by `tuner.config`."""
from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from tuner.errors import ConfigError

# What numpy (and so Optuna's samplers and bench_serving) accepts as a seed.
MAX_SEED = 2**32 - 1
# A study name is a file and folder name under --studies-dir and an Optuna study name.
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
# Numbers kttune's own variables hold; the simulator's are read by the simulated server, which
# would otherwise fail every launch with the same usage error.
_WHOLE = {"KTTUNE_HEARTBEAT_S": 1, "KTTUNE_SIM_SEED": 0}
_FRACTION = {"KTTUNE_SIM_TIME_SCALE", "KTTUNE_SIM_NOISE"}
_FOLDERS = {"KTTUNE_RUNTIME_DIR", "KTTUNE_SIM_NVML"}
_FREE_TEXT = {"KTTUNE_SIM_SCENARIO", "KTTUNE_SIM_NO_MEMORY_LOG", "KTTUNE_SERVER_TOKEN"}
# Read by the repository's scripts, tests and benchmarks, not by kttune.
_TOOLS = {"KTTUNE_BENCH_VENV", "KTTUNE_FAULT_DIR", "KTTUNE_FAULT_MARKER", "KTTUNE_PG_DB", "KTTUNE_PG_PORT"}
KNOWN_ENV = frozenset({*_WHOLE, *_FRACTION, *_FOLDERS, *_FREE_TEXT, *_TOOLS, "KTTUNE_SIM_DIALECT", "KTTUNE_SIM_FAULT"})


def check_study_name(name: str, where: str = "--study") -> str:
    """A name that stays one file and one folder under --studies-dir: no separator, no `..`,
    no leading dot or dash, no space or control character."""
    if not _STUDY_NAME.match(name):
        raise ConfigError(f"{where}: {name!r} cannot name a study (it names a database file and a folder under "
                          "--studies-dir); use letters, digits and . _ + - only, e.g. qwen3-1x4090-a")
    return name


def check_storage_url(url: str) -> str:
    """A storage that outlives the command: an in-memory SQLite would take every result with
    it when kttune exits."""
    if url.startswith("sqlite:") and url.split("?", 1)[0] in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        raise ConfigError(f"--storage: {url!r} is an in-memory database, gone when kttune exits; give a file, "
                          "e.g. sqlite:///studies/x.db")
    return url


def check_folder(path: Path, where: str) -> Path:
    """A folder kttune writes into: not a file, not under /proc or /sys."""
    p = Path(os.path.expanduser(str(path)))
    resolved = p.resolve()
    if resolved.parts[1:2] in (("proc",), ("sys",)):
        raise ConfigError(f"{where}: cannot write in {resolved} (a kernel file system); choose a folder of yours")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{where}: {p} is a file, not a folder; choose a folder (it is created if missing)")
    return p


def check_seed(seed: int | None, where: str = "--seed") -> int | None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{where}: must be between 0 and {MAX_SEED} (what the samplers accept), got {seed}")
    return seed


def check_port(port: int, where: str = "--port") -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: {port} is not a TCP port; use 1024-65535")
    return port


def check_port_free(host: str, port: int, where: str = "--port") -> None:
    """A port a server can listen on now (the dashboard's): one in use is a line, not a traceback."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host: cannot resolve {host!r} ({exc}); use 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def check_seconds(value: float, where: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: must be a positive number of seconds, got {value}")
    return value


def check_env(environ: Mapping[str, str], where: str = "environment") -> None:
    """The KTTUNE_* variables: known names (a misspelt one would be ignored without a word) with
    values of their kind."""
    for name, raw in environ.items():
        if not name.startswith("KTTUNE_"):
            continue
        value = str(raw).strip()
        label = f"{where} variable {name}"
        if name not in KNOWN_ENV:
            close = difflib.get_close_matches(name, sorted(KNOWN_ENV), n=1)
            fix = f"did you mean {close[0]}?" if close else f"unset it (kttune reads {', '.join(sorted(KNOWN_ENV))})"
            raise ConfigError(f"{label}: kttune has no such variable; {fix}")
        if name in _WHOLE and value and not (value.isdigit() and int(value) >= _WHOLE[name]):
            raise ConfigError(f"{label}: must be a whole number ≥ {_WHOLE[name]}, got {raw!r}; fix or unset it")
        if name in _FRACTION and value:
            try:
                ok = math.isfinite(float(value)) and float(value) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"{label}: must be a number ≥ 0, got {raw!r}; fix or unset it")
        if name in _FOLDERS and value and (not os.path.isabs(os.path.expanduser(value)) or Path(value).is_file()):
            raise ConfigError(f"{label}: must be an absolute folder path, got {raw!r}; fix or unset it")
        if name == "KTTUNE_SIM_DIALECT" and value:
            from tuner.sim.args import DIALECTS

            if value not in DIALECTS:
                raise ConfigError(f"{label}: {raw!r} is not a simulated dialect; use one of {', '.join(DIALECTS)}")
        if name == "KTTUNE_SIM_FAULT" and value:
            from tuner.sim.faults import parse_faults

            try:
                parse_faults(value)
            except ValueError as exc:
                raise ConfigError(f"{label}: {exc}") from None
