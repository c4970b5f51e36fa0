"""Refuse, before the first launch, flags the installed server or bench client does not accept.

The server's flags come from its own parser (:mod:`tuner.preflight.dialect`); this module's
``--help`` reading is the fallback where that parser cannot be built, and the bench client's check.

``sglang.launch_server`` and ``sglang.bench_serving`` differ between sglang and sglang-kt
versions (e.g. the removed ``--kt-amx-*`` flags), and a wrong flag would otherwise cost a
full launch per trial (``unrecognized arguments``) or a failed benchmark. The check runs
``--help`` of each configured command under its interpreter, reads the option strings,
and compares them with every flag kttune would pass. Help texts are cached per command in
memory and, when the installed package can be identified, on disk.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.config import AUTO, ENV_PREFIX, EXPERT_LOCATION_FLAG
from tuner.errors import ConfigError
from tuner.preflight.dialect import ParserCache, ServerDialect, ServerOptions, detect_dialect, kttune_cache
from tuner.server import RECORDER_FLAGS

DEFAULT_TIMEOUT_S = 180.0
_CACHE_VERSION = 1
# One option entry in argparse help: indented a little, starting with a dash. Continuation
# lines of the help column are indented much further and are not read.
_OPTION_LINE = re.compile(r"^ {1,8}(-{1,2}[A-Za-z0-9].*)$")
_OPTION = re.compile(r"(?:^|,\s+)(--?[A-Za-z0-9][\w.-]*)")
_USAGE_OPTION = re.compile(r"(?:^|[\s\[(|])(--[A-Za-z0-9][\w.-]*)")
# Run inside the target interpreter: which distribution provides the module, and a stamp
# of its installed files, without importing it (imports can take minutes, e.g. torch).
_PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, sys
mod = sys.argv[1]
top = mod.split(".")[0]
out = {"python": sys.version.split()[0], "dists": {}, "stamp": None}
try:
    for d in md.packages_distributions().get(top, []):
        try:
            out["dists"][d] = md.version(d)
        except Exception:
            pass
except Exception:
    pass
try:
    spec = importlib.util.find_spec(top)
    roots = list(spec.submodule_search_locations or []) if spec else []
    if spec and not roots and spec.origin:
        roots = [spec.origin]
    newest, count = 0.0, 0
    for root in roots:
        if os.path.isfile(root):
            newest, count = max(newest, os.stat(root).st_mtime), count + 1
            continue
        for d, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    newest, count = max(newest, os.stat(os.path.join(d, f)).st_mtime), count + 1
    if count:
        out["stamp"] = [roots, newest, count]
except Exception:
    pass
print(json.dumps(out))
"""


@dataclass(frozen=True)
class ToolHelp:
    """What one command's ``--help`` says it accepts."""

    command: tuple[str, ...]
    flags: frozenset[str]
    version: str | None = None

    def describe(self) -> str:
        """e.g. ``sglang.bench_serving (sglang-kt 0.7.2, /venv/bin/python)``."""
        target = _module_of(self.command)
        if target is None:
            return " ".join(self.command)
        ver = f"{self.version}, " if self.version else ""
        return f"{target[1]} ({ver}{target[0]})"


def parse_help_flags(text: str) -> frozenset[str]:
    """Long option strings (``--x``) of an argparse help text: every option entry line,
    plus the usage block. Words inside help paragraphs are never taken for options."""
    flags: set[str] = set()
    lines = text.splitlines()
    for line in lines:
        m = _OPTION_LINE.match(line.rstrip())
        if not m:
            continue
        invocation = re.split(r"\s{2,}", m.group(1), maxsplit=1)[0]
        flags.update(f for f in _OPTION.findall(invocation) if f.startswith("--"))
    usage: list[str] = []
    for line in lines:
        if line.lower().startswith("usage:"):
            usage.append(line[6:])
        elif usage and line.strip():
            usage.append(line)
        elif usage:
            break
    for line in usage:
        flags.update(_USAGE_OPTION.findall(line))
    flags.discard("--")
    return frozenset(flags)


def _module_of(command: Sequence[str]) -> tuple[str, str] | None:
    """(interpreter, module) when the command is ``python -m module``."""
    if len(command) >= 3 and command[1] == "-m":
        return command[0], command[2]
    return None


@dataclass
class HelpCache:
    """``--help`` results per command. ``cache_dir=None`` keeps them in memory only."""

    cache_dir: Path | None = field(default_factory=lambda: kttune_cache("help"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    runs: int = 0  # how many --help commands actually ran (for tests and logs)
    _memory: dict[tuple[str, ...], ToolHelp] = field(default_factory=dict)

    def get(self, command: Sequence[str], env: Mapping[str, str] | None = None, *, where: str) -> ToolHelp:
        """The accepted flags of ``command``; raises ConfigError (naming ``where``) when
        ``command --help`` cannot run or exits non-zero."""
        key = tuple(command)
        if key in self._memory:
            return self._memory[key]
        full_env = {**os.environ, **(env or {})}
        probe = self._probe(key, full_env)
        disk_key = self._disk_key(key, probe)
        help_ = self._load(disk_key, key) if disk_key else None
        if help_ is None:
            help_ = ToolHelp(key, self._run_help(key, full_env, where), _version(probe))
            if disk_key:
                self._store(disk_key, help_)
        self._memory[key] = help_
        return help_

    def _probe(self, command: tuple[str, ...], env: Mapping[str, str]) -> dict[str, Any] | None:
        target = _module_of(command)
        if target is None:
            return None
        try:
            res = subprocess.run([target[0], "-c", _PROBE, target[1]], capture_output=True, text=True,
                                 timeout=min(60.0, self.timeout_s), env=dict(env), stdin=subprocess.DEVNULL)
            data = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            return None
        return data if isinstance(data, dict) else None

    def _disk_key(self, command: tuple[str, ...], probe: Mapping[str, Any] | None) -> str | None:
        if self.cache_dir is None or not probe or not probe.get("stamp"):
            return None
        try:
            st = os.stat(os.path.realpath(command[0]))
        except OSError:
            return None
        payload = [_CACHE_VERSION, list(command), os.path.realpath(command[0]), st.st_mtime, st.st_size,
                   probe.get("python"), probe.get("dists"), probe.get("stamp")]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def _load(self, disk_key: str, command: tuple[str, ...]) -> ToolHelp | None:
        assert self.cache_dir is not None
        try:
            data = json.loads((self.cache_dir / f"{disk_key}.json").read_text())
            return ToolHelp(command, frozenset(data["flags"]), data.get("version"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _store(self, disk_key: str, help_: ToolHelp) -> None:
        assert self.cache_dir is not None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".help-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"flags": sorted(help_.flags), "version": help_.version, "command": list(help_.command)}, f)
            os.replace(tmp, self.cache_dir / f"{disk_key}.json")
        except OSError:
            pass  # a cache that cannot be written only costs time

    def _run_help(self, command: tuple[str, ...], env: Mapping[str, str], where: str) -> frozenset[str]:
        self.runs += 1
        shown = " ".join([*command, "--help"])
        try:
            res = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=self.timeout_s,
                                 env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot run `{shown}` ({exc}); fix the interpreter path") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{where}: `{shown}` did not finish within {self.timeout_s:g} s; "
                              "check the environment (or skip the compatibility check)") from None
        if res.returncode != 0:
            last = _last_line(res.stderr) or _last_line(res.stdout) or "no output"
            raise ConfigError(f"{where}: `{shown}` failed (rc {res.returncode}: {last}); "
                              "install the package in that interpreter or point the space at the right one")
        flags = parse_help_flags(res.stdout)
        if not flags:
            raise ConfigError(f"{where}: `{shown}` printed no options; is it the right program?")
        return flags


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _version(probe: Mapping[str, Any] | None) -> str | None:
    dists = (probe or {}).get("dists") or {}
    return ", ".join(f"{name} {ver}" for name, ver in sorted(dists.items())) or None


# ---------------------------------------------------------------- what kttune would pass


def server_flags(space: Any) -> dict[str, str]:
    """Every server flag kttune may pass, mapped to where in the space it comes from."""
    out = {"--host": "kttune (server.host)", "--port": "kttune (server.port)"}
    for key, value in space.server.args.items():
        if value is not None and value is not False:
            out[f"--{key}"] = f"server.args.{key}"
    for p in space.params:
        if not p.flag.startswith(ENV_PREFIX):  # an environment variable, not a flag
            out[f"--{p.flag}"] = f"params.{p.flag}"
    if space.offers_frequency_placement():  # the study's recording launch, and what frequency reads
        for flag in (*RECORDER_FLAGS, EXPERT_LOCATION_FLAG):
            out.setdefault(f"--{flag}", "kttune (the expert-distribution recording for frequency placement)")
    return out


def bench_flags(space: Any) -> dict[str, str]:
    """Every bench_serving flag kttune may pass (its own ones and each workload's extra_args)."""
    from tuner.bench import build_bench_argv

    out: dict[str, str] = {}
    bench = space.bench if space.bench.module else dataclasses.replace(space.bench, module="bench")  # only flags are read
    for w in space.workloads:
        extra = {f"--{k}" for k, v in w.extra_args.items() if v is not None and v is not False}
        argv = build_bench_argv(bench, w, host=space.server.host, port=1, output_file=Path("out.jsonl"),
                                tokenizer=space.bench.tokenizer or "tokenizer", slos=space.slos)
        for tok in argv[3:]:
            if tok.startswith("--") and tok not in out:
                out[tok] = f"workloads.{w.name}.extra_args" if tok in extra else f"kttune (workload {w.name})"
    return out


@dataclass(frozen=True)
class CompatReport:
    """What was checked: the server (its dialect, and its flags from its own parser or, where that
    cannot be built, from --help), the bench client, and the space with its bench module found."""

    dialect: ServerDialect
    server_flags_from: str  # "parser" or "help"
    bench: ToolHelp
    space: Any


def unsupported(accepted: frozenset[str], wanted: Mapping[str, str]) -> list[str]:
    """``--flag (from where[; did you mean --x])`` for each wanted flag not accepted."""
    bad = []
    for flag, where in wanted.items():
        if flag in accepted:
            continue
        close = difflib.get_close_matches(flag, sorted(accepted), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}" if close else ""
        bad.append(f"{flag} (from {where}{hint})")
    return bad


def server_options(space: Any, *, parsers: ParserCache | None = None,
                   timeout_s: float = 60.0) -> tuple[ServerDialect, ServerOptions | None, str]:
    """The dialect and, from its own parser, the options of the server the space launches
    (None and why where the parser cannot be built)."""
    dialect = detect_dialect(space, timeout_s=timeout_s)
    if dialect.name == "unknown" and not dialect.simulated:
        return dialect, None, f"{dialect.python} has no sglang distribution"
    opts, why = (parsers if parsers is not None else ParserCache()).options(space, dialect)
    return dialect, opts, why


def check_space_compat(space: Any, *, cache: HelpCache | None = None, parsers: ParserCache | None = None) -> CompatReport:
    """Raise ConfigError, in one line, when the installed server or bench client rejects a
    flag the space would pass; else return what was checked (with the space's bench module found)."""
    from tuner.bench import resolve_bench

    cache = cache if cache is not None else HelpCache()
    dialect, opts, _why = server_options(space, parsers=parsers)
    if opts is not None:
        check_server_options(space, opts, dialect)
        source = "parser"
    else:  # the fallback: option strings read from --help
        server = cache.get(list(space.server.launcher()), space.server.env, where="server")
        bad = unsupported(server.flags, server_flags(space))
        if bad:
            raise ConfigError(f"server: {server.describe()} does not accept {', '.join(bad)}; "
                              "remove or rename the flag, or install a server version that has it")
        source = "help"
    space = resolve_bench(space)
    bench = cache.get([space.bench.python, "-m", space.bench.module], space.bench.env, where="bench")
    bad = unsupported(bench.flags, bench_flags(space))
    if bad:
        raise ConfigError(f"bench: {bench.describe()} does not accept {', '.join(bad)}; "
                          "remove or rename the flag, or install a bench client version that has it")
    return CompatReport(dialect, source, bench, space)


def _value_problem(opt: Mapping[str, Any], value: Any) -> str | None:
    """Why the parser would refuse `value` for this option (choices and int/float types), or None."""
    if opt.get("kind") in ("store_true", "store_false"):
        return None if isinstance(value, bool) else f"is an on/off switch, got {value!r}"
    values = value if isinstance(value, list) else [value]
    for v in values:
        text = str(v).lower() if isinstance(v, bool) else str(v)
        choices = opt.get("choices")
        if choices is not None and text not in [str(c) for c in choices]:
            return f"{text!r} is not one of its choices {list(choices)}"
        kind = opt.get("type")
        try:
            if kind == "int":
                int(text)
            elif kind == "float":
                float(text)
        except ValueError:
            return f"takes an {kind}, got {text!r}"
    return None


def check_server_options(space: Any, opts: ServerOptions, dialect: ServerDialect) -> None:
    """Raise ConfigError, in one line, for the first tuned or fixed flag the server's parser does
    not define, or a value it would refuse (a choice it lacks, a number that is not one)."""
    wanted = server_flags(space)
    bad = unsupported(opts.flags, wanted)
    if bad:
        raise ConfigError(f"server: {dialect.describe()} has no {', '.join(bad)}; remove it from the space "
                          "or install a server version that has it")
    for p in space.params:
        opt = opts.by_flag.get(f"--{p.flag}")
        if opt is None:
            continue
        for value in p.choices or ():
            if (why := _value_problem(opt, value)) is not None:
                raise ConfigError(f"params.{p.flag}: {why} ({dialect.describe()}); fix the choices")
    for key, value in space.server.args.items():
        opt = opts.by_flag.get(f"--{key}")
        if opt is not None and value is not None and value != AUTO and (why := _value_problem(opt, value)) is not None:
            raise ConfigError(f"server.args.{key}: {why} ({dialect.describe()}); fix the value")
