"""The watchdog every server and bench client runs under: it dies with the tuner and takes the
whole tree with it.

`die_with_tuner(argv)` wraps a command in a small Python shim (stdlib only, run with ``-S`` by
the tuner's interpreter) that

- becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``), so every descendant that loses its
  parent — a scheduler that double-forked, a helper that called ``setsid`` — is re-parented to
  it instead of to init, and stays findable;
- forks the real command (which gets ``PR_SET_PDEATHSIG=SIGKILL`` on the shim, and default
  signal dispositions) and mirrors its exit status, so callers see the command's return code;
- polls its parent (woken at once by ``PR_SET_PDEATHSIG=SIGUSR1``): when the tuner is gone,
  however it died (SIGKILL included), it sends SIGTERM to its process group and to every
  descendant, SIGKILL to what is left after ``GRACE_S``, reaps them and exits;
- when the command exits by itself, SIGKILLs what it left behind (a dead server's helpers are
  useless) before exiting with the command's status.

The shim ignores SIGTERM, SIGINT and SIGHUP: a teardown's ``killpg(SIGTERM)`` is for the server;
the shim follows once the server is gone, and ``killpg(SIGKILL)`` ends it like any member.
Linux only; elsewhere commands run unwrapped.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

GRACE_S = 3.0
POLL_S = 0.2

_SHIM = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
tuner, grace, poll, argv = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
me = os.getpid()
signal.signal(signal.SIGUSR1, lambda *_: None)  # only to cut a sleep short
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
libc.prctl(1, signal.SIGUSR1, 0, 0, 0)  # PR_SET_PDEATHSIG
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.getppid() != tuner:
    os._exit(1)
child = os.fork()
if child == 0:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(s, signal.SIG_DFL)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != me:
        os._exit(1)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write("kttune watchdog: cannot run %r: %s\n" % (argv[0], exc))
        sys.stderr.flush()
        os._exit(127)

def members():
    # Descendants (the subreaper adopts every orphan below it) and the group, never the shim.
    kids, group = {}, []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ppid, pgrp, pid = int(fields[1]), int(fields[2]), int(name)
            except (OSError, ValueError, IndexError):
                continue
            if fields[0] == "Z":
                continue
            kids.setdefault(ppid, []).append(pid)
            if pgrp == me and pid != me:
                group.append(pid)
    out, todo = set(group), [me]
    while todo:
        for pid in kids.get(todo.pop(), ()):
            out.add(pid)
            todo.append(pid)
    return out

status = None
def reap():
    global status
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child:
            status = st

def signal_all(sig):
    for pid in members():
        try:
            os.kill(pid, sig)
        except OSError:
            pass

def clear(first):
    if first != signal.SIGKILL:
        signal_all(first)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            reap()
            if not members():
                return
            time.sleep(0.05)
    signal_all(signal.SIGKILL)
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        reap()
        if not members():
            return
        time.sleep(0.05)

while True:
    reap()
    if status is not None:
        clear(signal.SIGKILL)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(me, sig)
            time.sleep(1)
            os._exit(128 + sig)
        os._exit(os.WEXITSTATUS(status))
    if os.getppid() != tuner:
        clear(signal.SIGTERM)
        os._exit(1)
    time.sleep(poll)
"""


def die_with_tuner(argv: Sequence[str], *, grace_s: float = GRACE_S) -> list[str]:
    """`argv` run under the watchdog shim (see the module doc): the returned argv's process is
    the shim, the command its child, and the process's exit status the command's. Linux only;
    elsewhere `argv` unchanged."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _SHIM, str(os.getpid()), f"{grace_s:g}", f"{POLL_S:g}", *argv]
