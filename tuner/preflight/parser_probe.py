"""The server's own argument parser, asked from the server's interpreter.

Run as a file (``python parser_probe.py MODE ...``) by ``server.python``, so it needs nothing but
the standard library and the installed sglang; kttune reads its one tagged JSON line. Modes:

- ``dump``: ``ServerArgs.add_cli_args`` on a fresh parser (``srt/server_args.py`` in both
  sglang-kt 0.7.2 and upstream 0.5.23), every option's strings, type, choices, default, nargs
  and action kind;
- ``check-config FILE``: the ``--config FILE`` merge of that server
  (``ConfigArgumentMerger``: ``srt/server_args_config_parser.py`` in sglang-kt,
  ``srt/utils/server_args_config_parser.py`` upstream), then ``parse_args`` of the result, as
  ``prepare_server_args`` does before it builds ``ServerArgs``; refusals are reported, not raised.

The simulator answers ``dump`` with :func:`dump_parser` over its own parser, so both are read alike.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

TAG = "KTTUNE_PARSER "
_MERGERS = ("sglang.srt.utils.server_args_config_parser", "sglang.srt.server_args_config_parser")


def _plain(value: Any) -> Any:
    """A JSON-able form of a default or choice (enums and callables by their string)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction) or (action.nargs == 0 and action.const is True):
        return "store_true"
    if isinstance(action, argparse._StoreFalseAction):
        return "store_false"
    if isinstance(action, argparse._StoreAction):
        return "store"
    return type(action).__name__


def dump_parser(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{"options": [{flags, dest, kind, type, choices, default, nargs}, ...]}`` of every
    optional argument but ``--help``."""
    options = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        kind = action.type
        options.append({
            "flags": list(action.option_strings),
            "dest": action.dest,
            "kind": _kind(action),
            "type": getattr(kind, "__name__", None) if kind is not None else None,
            "choices": _plain(list(action.choices)) if action.choices is not None else None,
            "default": _plain(action.default) if action.default is not argparse.SUPPRESS else None,
            "nargs": _plain(action.nargs),
        })
    return {"options": options}


class _Refusal(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit 2
        raise _Refusal(message)


def _server_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = _Parser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    return parser


def check_config(parser: argparse.ArgumentParser, path: str, merger_module: str) -> dict[str, Any]:
    """The verdict of the server's ``--config`` merge and parse on ``path``."""
    argv = ["--config", path]
    try:
        merger = importlib.import_module(merger_module).ConfigArgumentMerger(parser)
        argv = merger.merge_config_with_args(argv)
        ns = parser.parse_args(argv)
    except (_Refusal, ValueError, TypeError, KeyError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Refusal) else str(exc),
                "argv": argv}
    return {"ok": True, "argv": argv, "parsed": {k: _plain(v) for k, v in vars(ns).items()}}


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "dump"
    try:
        parser = _server_parser()
    except Exception as exc:  # noqa: BLE001 - the caller falls back to --help and says why
        print(TAG + json.dumps({"error": f"{type(exc).__name__}: {exc}"[-400:]}), flush=True)
        return 1
    if mode == "dump":
        out = dump_parser(parser)
    elif mode == "check-config" and len(argv) == 2:
        merger, failures = None, []
        for name in _MERGERS:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                failures.append(f"{name}: {exc}")
                continue
            merger = name
            break
        if merger is None:  # without the merger the file cannot be read as the server reads it
            print(TAG + json.dumps({"error": "no --config merger: " + "; ".join(failures)}), flush=True)
            return 1
        out = check_config(parser, argv[1], merger)
        out["merger"] = merger
    else:
        print(TAG + json.dumps({"error": f"unknown mode {argv!r}"}), flush=True)
        return 2
    print(TAG + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
