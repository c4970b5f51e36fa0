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
    decisive_line,
    line_abort_reason,
    shows_progress,
    startup_phase,
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
        # Progress bars (tqdm) redraw with a bare carriage return: it ends a line too.
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
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


def failure_message(headline: str | None, what: str, log_path: Path, text: str) -> str:
    """A failure as users read it: the log's decisive line first (else what happened), then
    what happened and the file to read, then the log's last lines."""
    first = headline or what
    second = f"{what}; read {log_path}" if headline else f"read {log_path}"
    return f"{first}\n{second}\nlast lines:\n{_tail(text)}"


def _launch_error(handle: ServerHandle, text: str, reason: str, what: str) -> ServerLaunchError:
    return ServerLaunchError(
        failure_message(decisive_line(text), f"server pid {handle.pid} {what} (reason {reason})", handle.log_path, text),
        reason=reason,
    )


def _settle(handle: ServerHandle, settle_s: float) -> None:
    """Give a dying server a moment to finish writing its traceback."""
    deadline = time.monotonic() + settle_s
    while handle.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


class _Progress:
    """How far start-up got: the last phase (tuner.server.logscan.startup_phase) and when the
    log last showed progress (a new phase, a progress-bar step, a batch)."""

    def __init__(self, since: float) -> None:
        self.phase = "launched"
        self.at = since

    def feed(self, line: str, now: float) -> None:
        phase = startup_phase(line)
        if phase is not None and phase != self.phase:
            self.phase, self.at = phase, now
        elif phase is not None or shows_progress(line):
            self.at = now


def wait_ready(
    handle: ServerHandle,
    *,
    timeout_s: float,
    stall_timeout_s: float | None = None,
    poll_s: float = 0.5,
    health_timeout_s: float = 5.0,
    settle_s: float = 2.0,
) -> float:
    """Block until the server is ready; return seconds since launch.

    Raises ServerLaunchError (reason from the log, else ``exited_rc_N``) when the
    process exits first or logs a fatal line (even while still running: the process
    is not stopped here, call stop_server), ReadinessTimeout after ``timeout_s``.
    With ``stall_timeout_s``, a log that shows no progress for that long ends the wait
    early: reason ``unhealthy`` when HTTP is up and ``/health`` answers but never 200,
    else ``stalled``, both naming the last phase reached. ``health_timeout_s`` bounds one
    ``/health`` call (SGLang's runs a 1-token generation); ``settle_s`` is how long to
    wait for the rest of a traceback.
    """
    deadline = time.monotonic() + timeout_s
    tail = LogTail(handle.log_path, handle.log_offset)
    progress = _Progress(handle.started_monotonic)
    http_up = False
    health: int | None = None  # the last /health status (None: no HTTP answer)
    health_url = f"{handle.base_url}/health"
    while True:
        now = time.monotonic()
        for line in tail.read_lines():
            if READY_LINE in line:
                return time.monotonic() - handle.started_monotonic
            progress.feed(line, now)
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
        if http_up:
            health = _http_status(health_url, max(0.1, min(health_timeout_s, remaining)))
            if health == 200:
                return time.monotonic() - handle.started_monotonic
        now = time.monotonic()
        if stall_timeout_s is not None and now - progress.at >= stall_timeout_s:
            raise _stall_error(handle, tail.full_text(), progress, http_up and health is not None, now)
        remaining = deadline - now
        if remaining <= 0:
            text = tail.full_text()
            raise ReadinessTimeout(failure_message(
                None, f"server pid {handle.pid} not ready after {timeout_s:.0f} s (last phase: {progress.phase}, "
                f"http up: {http_up})", handle.log_path, text))
        time.sleep(min(poll_s, remaining))


def _stall_error(handle: ServerHandle, text: str, progress: _Progress, answering: bool, now: float) -> ServerLaunchError:
    quiet = now - progress.at
    since = progress.at - handle.started_monotonic
    if answering:
        reason = "unhealthy"
        what = (f"server pid {handle.pid}: HTTP up but /health never 200, and no progress in the log for "
                f"{quiet:.0f} s (last phase: {progress.phase}, at +{since:.0f} s)")
    else:
        reason = "stalled"
        what = (f"server pid {handle.pid} stalled: no new start-up phase for {quiet:.0f} s "
                f"(last phase: {progress.phase}, at +{since:.0f} s)")
    return ServerLaunchError(failure_message(None, what, handle.log_path, text), reason=reason)


def is_alive(handle: ServerHandle, *, timeout_s: float = 2.0) -> bool:
    """Liveness during a benchmark: the process runs and ``GET /ping`` gets a non-5xx answer.

    ``/ping`` adds no request to the server (``/health`` would). A 404 still counts as
    alive, for servers without ``/ping``; 5xx (503 while shutting down) or no answer does not.
    """
    if handle.proc.poll() is not None:
        return False
    status = _http_status(f"{handle.base_url}/ping", timeout_s)
    return status is not None and status < 500
