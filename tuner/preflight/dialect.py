"""Which server the space launches, asked before the first launch, and the flags its own parser takes.

- **Dialect**: the distribution that provides ``sglang`` in ``server.python`` (``sglang-kt`` →
  the KT fork, ``sglang`` → upstream), its version, and the server-info route its
  ``srt/entrypoints/http_server.py`` declares, read from package metadata and source text in a
  subprocess (no import: importing sglang imports torch). A simulated server (``tuner.sim``)
  reports the dialect it plays (``--sim-dialect``).
- **Options**: ``ServerArgs.add_cli_args`` run in ``server.python``
  (:mod:`tuner.preflight.parser_probe`), or the simulator's ``dump-args``; option strings, types,
  choices and defaults, cached per interpreter and installed version. Where the parser cannot be
  built, the caller falls back to the ``--help`` regex (:mod:`tuner.preflight.compat`).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.preflight.parser_probe import TAG as PARSER_TAG

PROBE_FILE = Path(__file__).with_name("parser_probe.py")
SIMULATOR_MODULE = "tuner.sim"
_META_TAG = "KTTUNE_META "
# Run in server.python: who provides `sglang`, and which server-info route it serves.
_META_PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, sys
out = {"python": sys.version.split()[0], "dists": {}, "endpoints": []}
try:
    for d in md.packages_distributions().get("sglang", []):
        out["dists"][d] = md.version(d)
except Exception:
    pass
spec = importlib.util.find_spec("sglang")
for root in (list(spec.submodule_search_locations or []) if spec else []):
    path = os.path.join(root, "srt", "entrypoints", "http_server.py")
    if os.path.isfile(path):
        text = open(path, errors="replace").read()
        out["endpoints"] = [e for e in ("/server_info", "/get_server_info") if '"' + e + '"' in text]
        break
print("KTTUNE_META " + json.dumps(out))
"""


@dataclass(frozen=True)
class ServerDialect:
    """The installed server, as found before the first launch (stored on the study)."""

    name: str  # "sglang-kt", "upstream" or "unknown"
    package: str | None
    version: str | None
    python: str
    server_info_endpoint: str | None = None
    simulated: bool = False

    def describe(self) -> str:
        """e.g. ``upstream sglang 0.5.23 (simulated)`` or ``sglang-kt 0.7.2 (/venv/bin/python)``."""
        what = self.name if self.package in (None, self.name) else f"{self.name} {self.package}"
        ver = f" {self.version}" if self.version else ""
        return f"{what}{ver} ({'simulated' if self.simulated else self.python})"

    def to_attr(self) -> dict[str, Any]:
        return {"dialect": self.name, "package": self.package, "version": self.version, "python": self.python,
                "server_info_endpoint": self.server_info_endpoint, "simulated": self.simulated}


@dataclass(frozen=True)
class ServerOptions:
    """The options a server's parser defines: ``--flag`` → its dump entry (every alias)."""

    by_flag: Mapping[str, Mapping[str, Any]]
    source: str  # "parser" (its own add_cli_args) or "help" (the --help regex)

    @property
    def flags(self) -> frozenset[str]:
        return frozenset(self.by_flag)

    @classmethod
    def from_dump(cls, dump: Mapping[str, Any]) -> ServerOptions:
        by_flag: dict[str, Mapping[str, Any]] = {}
        for opt in dump.get("options") or []:
            for flag in opt.get("flags") or []:
                if flag.startswith("--"):
                    by_flag[flag] = opt
        return cls(by_flag, "parser")


def is_simulated(space: Any) -> bool:
    return any(SIMULATOR_MODULE in part for part in space.server.launcher())


def _sim_argv(space: Any) -> list[str]:
    """The simulator's ``dump-args`` command for the space's launcher and dialect."""
    argv = [*space.server.launcher(), "dump-args"]
    dialect = space.server.args.get("sim-dialect")
    return argv + (["--sim-dialect", str(dialect)] if dialect else [])


def _tagged(stdout: str, tag: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith(tag):
            try:
                data = json.loads(line[len(tag):])
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None


def _run(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **env},
                              stdin=subprocess.DEVNULL, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _python(space: Any) -> str:
    return str(space.server.command[0] if space.server.command else space.server.python)


def detect_dialect(space: Any, *, timeout_s: float = 60.0) -> ServerDialect:
    """The server the space would launch; ``unknown`` when the interpreter has no sglang."""
    python = _python(space)
    if is_simulated(space):
        res = _run(_sim_argv(space), space.server.env, timeout_s)
        data = _tagged(res.stdout, PARSER_TAG) if res is not None else None
        if data is None or "dialect" not in data:
            return ServerDialect("unknown", None, None, python, simulated=True)
        return ServerDialect(str(data["dialect"]), data.get("package"), data.get("version"), python,
                             "/server_info", simulated=True)
    res = _run([python, "-c", _META_PROBE], space.server.env, timeout_s)
    data = (_tagged(res.stdout, _META_TAG) if res is not None else None) or {}
    dists: dict[str, str] = dict(data.get("dists") or {})
    endpoints = list(data.get("endpoints") or [])
    endpoint = endpoints[0] if endpoints else None
    if "sglang-kt" in dists:
        return ServerDialect("sglang-kt", "sglang-kt", dists["sglang-kt"], python, endpoint)
    if "sglang" in dists:
        return ServerDialect("upstream", "sglang", dists["sglang"], python, endpoint)
    return ServerDialect("unknown", None, None, python, endpoint)


def kttune_cache(kind: str) -> Path:
    """kttune's cache folder for `kind` (parser dumps, --help texts), under XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kttune" / kind


@dataclass
class ParserCache:
    """Parser dumps per interpreter and installed version; ``cache_dir=None``: memory only."""

    cache_dir: Path | None = field(default_factory=lambda: kttune_cache("parser"))
    timeout_s: float = 600.0  # importing sglang's server args imports torch: minutes on a cold disk
    runs: int = 0
    _memory: dict[str, ServerOptions] = field(default_factory=dict)

    def options(self, space: Any, dialect: ServerDialect) -> tuple[ServerOptions | None, str]:
        """The server's options from its own parser, or (None, why) when it cannot be built."""
        python = _python(space)
        try:
            st = os.stat(os.path.realpath(python))
            stamp: list[Any] = [os.path.realpath(python), st.st_mtime, st.st_size]
        except OSError:
            stamp = [python]
        key = json.dumps([2, stamp, dialect.to_attr(), _sim_argv(space) if dialect.simulated else None], sort_keys=True)
        if key in self._memory:
            return self._memory[key], ""
        path = self._path(key)
        if path is not None and not dialect.simulated:
            try:
                opts = ServerOptions.from_dump(json.loads(path.read_text()))
                self._memory[key] = opts
                return opts, ""
            except (OSError, ValueError):
                pass
        self.runs += 1
        argv = _sim_argv(space) if dialect.simulated else [python, str(PROBE_FILE), "dump"]
        res = _run(argv, space.server.env, self.timeout_s)
        data = _tagged(res.stdout, PARSER_TAG) if res is not None else None
        if data is None or "options" not in data:
            why = (data or {}).get("error") or (f"`{' '.join(argv)}` timed out or could not run" if res is None
                                                 else f"exited {res.returncode}")
            return None, str(why)
        opts = ServerOptions.from_dump(data)
        self._memory[key] = opts
        if path is not None and not dialect.simulated:
            self._store(path, data)
        return opts, ""

    def _path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        import hashlib

        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    @staticmethod
    def _store(path: Path, data: Mapping[str, Any]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".parser-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written only costs time
