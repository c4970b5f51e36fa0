"""Log lines in the format SGLang writes them: `[YYYY-mm-dd HH:MM:SS] msg`, scheduler lines
tagged ` TP0`, and uvicorn's own lines, all on stderr."""
from __future__ import annotations

import sys
import time
from typing import Any


class Log:
    """SGLang-style lines (`[YYYY-mm-dd HH:MM:SS] msg`, scheduler lines with ` TP0`) on stderr."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr

    def __call__(self, msg: str, *, tp: int | None = None) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        rank = f" TP{tp}" if tp is not None else ""
        self._write(f"[{stamp}{rank}] {msg}")

    def uvicorn(self, level: str, msg: str) -> None:
        """uvicorn's format as sglang configures it: `[ts] INFO:     msg`."""
        self._write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {(level + ':').ljust(9)} {msg}")

    def raw(self, text: str) -> None:
        self._write(text)

    def _write(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass
