"""The expert-distribution recorder of a running server: start, stop and dump it over HTTP,
and find the file the dump wrote.

sglang writes the dump (`torch.save` of ``logical_count`` [buffer, layers, experts]) as
``expert_distribution_recorder_<time>.pt`` in ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``, and
records only when the server runs with ``--expert-distribution-recorder-mode stat``.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tuner.errors import KttuneError

RECORDER_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
#: The flag and value a recording server runs with.
RECORDER_FLAGS: Mapping[str, str] = {"expert-distribution-recorder-mode": "stat"}
DUMP_GLOB = "expert_distribution_recorder_*.pt"
#: Where a trial's dump goes, under its folder.
RECORDER_SUBDIR = "expert-distribution"


def recorder_dir(trial_dir: Path) -> Path:
    return trial_dir / RECORDER_SUBDIR


def _post(base_url: str, path: str, headers: Mapping[str, str], timeout_s: float) -> None:
    req = urllib.request.Request(base_url + path, data=b"", method="POST", headers=dict(headers))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise KttuneError(f"expert-distribution recorder: {path}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise KttuneError(f"expert-distribution recorder: {path}: {exc}") from exc


def start_recording(base_url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 60.0) -> None:
    _post(base_url, "/start_expert_distribution_record", headers or {}, timeout_s)


def stop_and_dump(base_url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 300.0) -> None:
    """Stop recording, then write the dump (the call returns once the file is written)."""
    _post(base_url, "/stop_expert_distribution_record", headers or {}, timeout_s)
    _post(base_url, "/dump_expert_distribution_record", headers or {}, timeout_s)


def find_dump(directory: Path) -> Path | None:
    """The newest dump in `directory`, or None."""
    found = sorted(directory.glob(DUMP_GLOB), key=lambda p: (p.stat().st_mtime, p.name))
    return found[-1] if found else None
