"""Pure argv building: launch flags (dict) → a list for subprocess, never a shell string."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def flag_args(flags: Mapping[str, Any]) -> list[str]:
    """Render flags the way SGLang's --config parser does: True ⇒ bare switch, False ⇒
    omitted, lists ⇒ several values, anything else ⇒ str(value)."""
    out: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            out.append(f"--{key}")
            out.extend(str(v) for v in value)
        else:
            out.extend([f"--{key}", str(value)])
    return out


def build_server_argv(launcher: Sequence[str], flags: Mapping[str, Any], *, host: str, port: int) -> list[str]:
    """`launcher` is e.g. [python, -m, sglang.launch_server]; host/port are per trial."""
    return [*launcher, *flag_args(flags), "--host", host, "--port", str(port)]
