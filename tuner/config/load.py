"""A search space from a file, or from what a study stored: YAML read strictly (a key given
twice is an error, not the last one silently winning) and handed to :func:`parse_space`."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tuner.config.parse import parse_space
from tuner.config.specs import SearchSpace
from tuner.errors import ConfigError


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (`<<` merges excepted): YAML
    says keys are unique, PyYAML keeps the last one without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the base class says so
                break
        return super().construct_mapping(node, deep)


def read_yaml(p: Path) -> Any:
    """The document of a YAML file; ConfigError naming the line for bad syntax or a repeated key."""
    try:
        text = p.read_bytes().decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
    except UnicodeDecodeError:
        raise ConfigError(f"--space: {p} is not a text file (a binary, compressed or database file?); "
                          "pass a search-space YAML file") from None
    except OSError as exc:
        raise ConfigError(f"--space: cannot read {p} ({exc.strerror}); pass a readable search-space YAML file") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(f"{p} line {dup.line}: key {dup.key!r} is given twice (first on line {dup.first}), "
                          "and only one can count; keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{at}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None


def load_space(path: str | Path, *, check_paths: bool = True) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        inside = sorted(x.name for x in p.glob("*.yaml"))
        listed = f" (it holds {', '.join(inside[:5])})" if inside else ""
        raise ConfigError(f"--space: {p} is a folder{listed}; pass a search-space YAML file")
    if not p.is_file():
        what = "is not a regular file" if p.exists() else "does not exist"
        raise ConfigError(f"--space: {p} {what}; pass a search-space YAML file (e.g. one from search_spaces/)")
    return parse_space(read_yaml(p), path=p, check_paths=check_paths)


def stored_space(record: Mapping[str, Any]) -> SearchSpace | None:
    """The space a study stored at its run (see `tuner.storage` space records), or None when
    the study was written before documents were stored. Its paths are not checked: the
    commands that read a study launch nothing."""
    document, base = record.get("document"), record.get("base")
    if not isinstance(document, Mapping):
        return None
    path = record.get("path")
    return parse_space(dict(document), path=Path(path) if path else None, check_paths=False,
                       base=Path(base) if base else None)
