"""The space a command that only reads a study works with: the one the study stored at its run
(`tuner.storage.space_record`), so that no file is needed, or a given one, with a line where it
differs from the stored one."""
from __future__ import annotations

from tuner.config import SearchSpace, stored_space
from tuner.errors import ConfigError
from tuner.storage import STUDY_ATTR_SPACE, load_study, space_record


def stored_study_space(study_name: str, storage: str) -> SearchSpace:
    """The space study `study_name` stored; ConfigError when it stored none (an older kttune)."""
    record = load_study(study_name, storage).user_attrs.get(STUDY_ATTR_SPACE)
    space = stored_space(record) if isinstance(record, dict) else None
    if space is None:
        raise ConfigError(f"--space: study {study_name!r} was run by a kttune that did not store its space; "
                          "pass the space it was run with, --space FILE")
    return space


def space_change_note(space: SearchSpace, study_name: str, storage: str) -> str:
    """One line when `space` is not the one the study stored (a colleague's copy, an edit after
    the run), naming the top-level keys that differ; "" when equal or nothing is stored."""
    try:
        record = load_study(study_name, storage).user_attrs.get(STUDY_ATTR_SPACE)
    except ConfigError:
        return ""  # the command itself says what is missing
    stored = record.get("document") if isinstance(record, dict) else None
    if not isinstance(stored, dict):
        return ""
    given = space_record(space)["document"]
    changed = sorted(k for k in {*stored, *given} if stored.get(k) != given.get(k))
    if not changed:
        return ""
    where = str(space.path) if space.path else space.name
    return (f"--space {where} differs from the space study {study_name} stored at its run (in {', '.join(changed)}); "
            "reading the study with --space (leave it out to use the stored one)")
