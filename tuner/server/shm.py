"""kt-kernel's shared-memory buffers (``/dev/shm/kt_buf_*``): the ones a server tree maps or
holds open, and this user's that no live process holds any more; teardown removes both."""
from __future__ import annotations

import os
from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "kt_buf_"


def kt_shm_paths(pid: int) -> set[Path]:
    """/dev/shm/kt_buf_* files a process maps or holds open (Linux /proc)."""
    paths: set[Path] = set()
    prefix = str(SHM_DIR / SHM_PREFIX)
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                idx = line.find(prefix)
                if idx >= 0:
                    paths.add(Path(line[idx:].rstrip("\n").removesuffix(" (deleted)")))
    except OSError:
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(prefix):
                paths.add(Path(target.removesuffix(" (deleted)")))
    except OSError:
        pass
    return paths


def remove_files(paths: set[Path]) -> tuple[str, ...]:
    removed = []
    for path in sorted(paths):
        try:
            path.unlink()
            removed.append(str(path))
        except OSError:
            continue
    return tuple(removed)


def orphan_shm_files(started_at: float) -> set[Path]:
    """kt_buf files of this user created since ``started_at`` that no live process holds."""
    try:
        candidates = {
            p
            for p in SHM_DIR.glob(SHM_PREFIX + "*")
            if (st := p.stat()).st_uid == os.getuid() and st.st_ctime >= started_at - 1.0
        }
    except OSError:
        return set()
    if not candidates:
        return set()
    held: set[Path] = set()
    for pid in psutil.pids():
        held |= kt_shm_paths(pid)
    return candidates - held
