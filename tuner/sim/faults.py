"""Failure modes of the simulated server: injected faults and how the real launcher dies.

Injected faults (`--sim-fault` / KTTUNE_SIM_FAULT) are comma-separated switches, e.g.
`slow_start=30,crash_after=5`:

| switch | effect |
|---|---|
| `crash_at_start` | TP0 scheduler dies natively during weight loading (real text: `Rank 0 scheduler is dead`) |
| `hang_at_start` | loading never finishes: no more lines, never binds, never ready |
| `slow_start=S` | S extra simulated seconds of weight loading |
| `crash_after=N` | the (N+1)-th user generate request kills the server (server warmup and /health excluded) |
| `port_in_use` | behave as if the HTTP bind failed after the full load |
| `stall_after=P` | start-up stops without a word after phase P: `weights` (`Load weight end`), `kv` (`KV Cache is allocated`) or `graphs` (`Capture cuda graph end`); never binds |
| `unhealthy` | HTTP comes up, but the warm-up never finishes: `/health` answers 503 for ever, nothing more is logged |
| `slow_warmup=S` | HTTP up, then S extra simulated seconds of warm-up (`/health` 503) that log a batch line every 10 s |
| `garbage_output` | degenerate text (one token repeated) produced at twice the speed |
| `empty_output` | the completion counts its tokens but their text is empty (a broken detokenizer) |
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

KNOWN = ("crash_at_start", "hang_at_start", "slow_start", "crash_after", "port_in_use", "garbage_output",
         "empty_output", "stall_after", "unhealthy", "slow_warmup")
# stall_after's phases: the log line after which start-up stops.
STALL_PHASES = {"weights": "Load weight end", "kv": "KV Cache is allocated", "graphs": "Capture cuda graph end"}


@dataclass(frozen=True)
class Faults:
    crash_at_start: bool = False
    hang_at_start: bool = False
    slow_start_s: float = 0.0
    crash_after: int | None = None
    port_in_use: bool = False
    garbage_output: bool = False
    empty_output: bool = False
    stall_after: str | None = None  # a key of STALL_PHASES
    unhealthy: bool = False
    slow_warmup_s: float = 0.0

    def stalls_after(self, line: str) -> bool:
        return self.stall_after is not None and line.startswith(STALL_PHASES[self.stall_after])


def parse_faults(spec: str) -> Faults:
    """Parse `a,b=1,...`; raises ValueError naming the bad item and the known switches."""
    fields: dict[str, Any] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        value = value.strip()
        if name not in KNOWN:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(KNOWN)}")
        if name == "slow_start":
            fields["slow_start_s"] = _number(name, value, float)
        elif name == "crash_after":
            fields["crash_after"] = _number(name, value, int)
        elif name == "slow_warmup":
            fields["slow_warmup_s"] = _number(name, value, float)
        elif name == "stall_after":
            if value not in STALL_PHASES:
                raise ValueError(f"fault 'stall_after' needs a phase ({', '.join(STALL_PHASES)}), got {value!r}")
            fields["stall_after"] = value
        elif value:
            raise ValueError(f"fault {name!r} takes no value, got {value!r}")
        else:
            fields[name] = True
    return Faults(**fields)


def _number(name: str, value: str, kind: type) -> float | int:
    try:
        out = kind(value)
    except ValueError:
        raise ValueError(f"fault {name!r} needs a {kind.__name__} value (e.g. {name}=5), got {value!r}") from None
    if out < 0:
        raise ValueError(f"fault {name!r} must be >= 0, got {value!r}")
    return out


class ProcessTree:
    """The launcher's children (fake schedulers) and the real server's ways of dying."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def kill_children(self) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    child.kill()
                except OSError:
                    pass
        for child in self.children:
            try:
                child.wait(timeout=2)
            except Exception:  # noqa: BLE001 - best effort, like psutil's kill
                pass

    def die(self, sig: int = signal.SIGKILL) -> None:
        """`kill_process_tree(os.getpid())`: children, then this process by `sig` (rc -sig)."""
        self.kill_children()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal is delivered before this returns
        os._exit(128 + sig)

    def dead_child(self) -> subprocess.Popen[bytes] | None:
        for child in self.children:
            if child.poll() is not None:
                return child
        return None


_SITE = "/usr/local/lib/python3.11/site-packages/sglang"


def scheduler_exception_lines(error: str | Sequence[str], *, at_init: bool = False) -> list[str]:
    """`Scheduler hit an exception: <traceback>` as TP0 logs it before SIGQUIT to the launcher."""
    body = [error] if isinstance(error, str) else list(error)
    frame = (["    scheduler = Scheduler(server_args, port_args, gpu_id, tp_rank, moe_ep_rank, pp_rank, dp_rank)"]
             if at_init else ["    scheduler.event_loop_overlap()",
                              f'  File "{_SITE}/srt/managers/scheduler.py", line 1104, in event_loop_overlap',
                              "    batch_result = self.run_batch(batch)"])
    return ["Scheduler hit an exception: Traceback (most recent call last):",
            f'  File "{_SITE}/srt/managers/scheduler.py", line 3240, in run_scheduler_process',
            *frame, *(ln for item in body for ln in item.splitlines())]


def native_crash_lines(exit_line: str) -> list[str]:
    """The launcher's view of a TP0 segfault during start-up (EOF on its pipe); exit 1 follows."""
    return ["Rank 0 scheduler is dead. Please check if there are relevant logs.", exit_line,
            "Traceback (most recent call last):",
            '  File "<frozen runpy>", line 198, in _run_module_as_main',
            f'  File "{_SITE}/launch_server.py", line 32, in <module>',
            "    run_server(server_args)",
            f'  File "{_SITE}/srt/entrypoints/engine.py", line 938, in _wait_for_scheduler_ready',
            "    data = scheduler_pipe_readers[i].recv()",
            "EOFError"]


def watchdog_line(timeout_s: float) -> str:
    return f"Scheduler watchdog timeout (self.watchdog_timeout={timeout_s!r}, self.soft=False)"
