"""Where `export` and `report` write (`--out`), checked before the study is read: a folder
that is missing, read-only or not a real file system (/proc, /sys) is one line, not a
traceback after the work is done."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tuner.errors import ConfigError


def _probe(folder: Path) -> None:
    """Create and remove a file in `folder`: permission bits say nothing to root, nor about a
    read-only mount or a pseudo file system, so try it."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kttune-probe-")
    except OSError as exc:
        raise ConfigError(f"--out: cannot write in {folder} ({exc.strerror}); choose a writable folder") from None
    os.close(fd)
    os.unlink(tmp)


def check_out_file(path: Path) -> None:
    """`path` is a new or replaceable .yaml file in an existing, writable folder."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--out: folder {parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; give a file name such as best.yaml")
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out: {path} must end in .yaml or .yml (sglang's --config requires it)")
    _probe(parent)


def check_out_dir(path: Path) -> None:
    """`path` is a folder, or can be made under its nearest existing ancestor, and is writable."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {path} is a file; give a folder")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--out: {ancestor} is a file, so {path} cannot be made; give a folder")
    _probe(ancestor)
