"""Wait until a launched server is really ready, or say why it never will be.

Ready means the log printed READY_LINE (after the warmup request), or ``GET /health``
returned 200 once the log showed the HTTP server up (``/health`` earlier is no gate).
``/v1/models``, ``/ping`` and ``/model_info`` answer before warmup and are not used.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

from tuner.errors import ReadinessTimeout, ServerLaunchError
from tuner.server.launch import ServerHandle
from tuner.server.logscan import (
    ABORT_REASONS,
    HTTP_UP_MARKERS,
    READY_LINE,
    classify_failure,
    line_abort_reason,
)

_TAIL_LINES = 25


class LogTail:
    """Reads complete new lines of a growing log file from a byte offset."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self._path = path
        self._start = offset
        self._pos = offset
        self._partial = b""

    def read_lines(self) -> list[str]:
        """Complete lines appended since the last call (a trailing partial line waits)."""
        try:
            with open(self._path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return []
        if not data:
            return []
        self._pos += len(data)
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        return data[:cut].decode(errors="replace").splitlines()

    def full_text(self) -> str:
        """Everything written since the start offset, partial last line included."""
        try:
            with open(self._path, "rb") as f:
                f.seek(self._start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _http_status(url: str, timeout_s: float) -> int | None:
    """HTTP status of a GET, or None when no HTTP answer came. Bypasses proxies."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _launch_error(handle: ServerHandle, text: str, reason: str, what: str) -> ServerLaunchError:
    return ServerLaunchError(
        f"server pid {handle.pid} {what} (reason {reason}); log {handle.log_path}; "
        f"last lines:\n{_tail(text)}",
        reason=reason,
    )


def _settle(handle: ServerHandle, settle_s: float) -> None:
    """Give a dying server a moment to finish writing its traceback."""
    deadline = time.monotonic() + settle_s
    while handle.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_ready(
    handle: ServerHandle,
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    health_timeout_s: float = 5.0,
    settle_s: float = 2.0,
) -> float:
    """Block until the server is ready; return seconds since launch.

    Raises ServerLaunchError (reason from the log, else ``exited_rc_N``) when the
    process exits first or logs a fatal line (even while still running: the process
    is not stopped here, call stop_server), ReadinessTimeout after ``timeout_s``.
    ``health_timeout_s`` bounds one ``/health`` call (SGLang's runs a 1-token
    generation); ``settle_s`` is how long to wait for the rest of a traceback.
    """
    deadline = time.monotonic() + timeout_s
    tail = LogTail(handle.log_path, handle.log_offset)
    http_up = False
    health_url = f"{handle.base_url}/health"
    while True:
        for line in tail.read_lines():
            if READY_LINE in line:
                return time.monotonic() - handle.started_monotonic
            if not http_up and any(m in line for m in HTTP_UP_MARKERS):
                http_up = True
            trigger = line_abort_reason(line)
            if trigger is not None:
                _settle(handle, settle_s)
                text = tail.full_text()
                reason = classify_failure(text, include_warnings=False)
                if reason not in ABORT_REASONS:
                    reason = trigger
                raise _launch_error(handle, text, reason, "logged a fatal error before ready")
        rc = handle.proc.poll()
        if rc is not None:
            text = tail.full_text()
            reason = classify_failure(text, include_warnings=False) or f"exited_rc_{rc}"
            raise _launch_error(handle, text, reason, f"exited with rc {rc} before ready")
        remaining = deadline - time.monotonic()
        if http_up and _http_status(health_url, max(0.1, min(health_timeout_s, remaining))) == 200:
            return time.monotonic() - handle.started_monotonic
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReadinessTimeout(
                f"server pid {handle.pid} not ready after {timeout_s:.0f} s "
                f"(http up: {http_up}); log {handle.log_path}; last lines:\n{_tail(tail.full_text())}"
            )
        time.sleep(min(poll_s, remaining))


def is_alive(handle: ServerHandle, *, timeout_s: float = 2.0) -> bool:
    """Liveness during a benchmark: the process runs and ``GET /ping`` gets a non-5xx answer.

    ``/ping`` adds no request to the server (``/health`` would). A 404 still counts as
    alive, for servers without ``/ping``; 5xx (503 while shutting down) or no answer does not.
    """
    if handle.proc.poll() is not None:
        return False
    status = _http_status(f"{handle.base_url}/ping", timeout_s)
    return status is not None and status < 500
