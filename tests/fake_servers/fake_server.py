"""A stand-in for ``sglang.launch_server`` with scriptable startup behaviour (tests only).

Writes SGLang-like log lines to stderr, optionally serves /health and /ping, and can
crash, hang, spawn SIGTERM-proof children, or leave a grandchild in its own session.
Each spawned helper prints ``FAKE <role>_pid=<pid>`` so tests can check it died.
"""
from __future__ import annotations

import argparse
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

READY_LINE = "The server is fired up and ready to roll!"


def sleeper(role: str) -> str:
    """Code for a helper that ignores SIGTERM and announces itself only after that."""
    return (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"sys.stderr.write(f'[x] FAKE {role}_pid={{os.getpid()}}\\n'); sys.stderr.flush()\n"
        "while True: time.sleep(1)\n"
    )


def log(msg: str) -> None:
    sys.stderr.write(f"[2025-01-01 00:00:00 TP0] {msg}\n")
    sys.stderr.flush()


def serve(host: str, port: int, ready_at: float, health_always: bool) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/ping":
                code = 200
            elif self.path == "/health":
                code = 200 if health_always or time.monotonic() >= ready_at else 503
            else:
                code = 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()


def spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--http", action="store_true", help="serve /health and /ping on --port")
    ap.add_argument("--health-always", action="store_true", help="/health is 200 from the start")
    ap.add_argument("--uvicorn-line", action="store_true", help="log 'Uvicorn running' once HTTP is up")
    ap.add_argument("--ready-after", type=float, default=None, help="seconds until ready")
    ap.add_argument("--ready-line", action="store_true", help="print READY_LINE when ready")
    ap.add_argument("--load-lines", action="store_true", help="log weight/KV lines first")
    ap.add_argument("--fail-with", default=None, help="text to log after --fail-after")
    ap.add_argument("--fail-after", type=float, default=0.2)
    ap.add_argument("--exit-rc", type=int, default=None, help="exit with this rc (after failing, if any)")
    ap.add_argument("--child-ignores-term", action="store_true")
    ap.add_argument("--setsid-grandchild", action="store_true", help="double-fork a grandchild into its own session")
    ap.add_argument("--shm", default=None, help="create and map /dev/shm/<name>")
    ap.add_argument("--ignore-term", action="store_true", help="the launcher itself ignores SIGTERM")
    args = ap.parse_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    start = time.monotonic()
    ready_at = start + (args.ready_after if args.ready_after is not None else 1e9)
    if args.child_ignores_term:
        spawn(sleeper("child"))
    if args.setsid_grandchild:
        # The middle process starts the grandchild in a new session and exits at once,
        # so the grandchild is neither in our group nor our descendant any more.
        middle = spawn(
            "import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', {sleeper('grandchild')!r}], start_new_session=True)\n"
        )
        middle.wait()
    if args.shm:
        fd = os.open(f"/dev/shm/{args.shm}", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        mapping = mmap.mmap(fd, 4096)  # noqa: F841 (kept mapped for the process lifetime)
        log(f"FAKE shm=/dev/shm/{args.shm}")
    if args.load_lines:
        log("Load weight end. elapsed=1.00 s, type=DeepseekV3ForCausalLM, avail mem=40.00 GB, mem usage=5.00 GB.")
        log("KV Cache is allocated. #tokens: 37000, KV size: 2.42 GB")
    if args.http:
        serve(args.host, args.port, ready_at, args.health_always)
        if args.uvicorn_line:
            log(f"Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    if args.fail_with is not None:
        time.sleep(args.fail_after)
        for line in args.fail_with.split("\\n"):
            log(line)
    if args.exit_rc is not None:
        sys.exit(args.exit_rc)
    if args.ready_after is not None and args.ready_line:
        time.sleep(max(0.0, ready_at - time.monotonic()))
        log(READY_LINE)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
