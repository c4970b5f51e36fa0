"""The space a study was run with (stored under STUDY_ATTR_SPACE) against the space a resumed
run brings: a change that would give finished trials another meaning is refused, naming it;
one the finished trials survive is accepted with a line saying what it means for them.

Refused: another objective or direction (the stored values would be compared with a different
quantity), a param added or removed (finished trials lack it or carry one the launch no longer
sets), a param whose Optuna distribution is not compatible (int ↔ float, log ↔ linear, other
choices). Accepted: a range or step moved within the same kind, and changed SLO bounds.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import check_distribution_compatibility, distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial

from tuner.config import SearchSpace
from tuner.errors import ConfigError

_FIX = "resume it with the space it was run with, or pass another --study name for the new space"


def space_record(space: SearchSpace) -> dict[str, Any]:
    """What STUDY_ATTR_SPACE holds: enough to tell, on resume, what the new space changes."""
    return {"name": space.name, "path": str(space.path) if space.path else None,
            "objectives": [o.key for o in space.objectives], "directions": list(space.directions),
            "params": {flag: json.loads(distribution_to_json(d)) for flag, d in space.distributions().items()},
            "slos": [s.describe() for s in space.slos],
            # The whole document (secrets redacted) and the folder its relative paths were read
            # from: `kttune best|show|export|report|dashboard` read the study without the file.
            "document": json.loads(json.dumps(space.redact(dict(space.document)), default=str)),
            "base": str(space.base) if space.base else None}


def resume_changes(stored: Mapping[str, Any], space: SearchSpace, study: optuna.Study,
                   trials: Sequence[FrozenTrial]) -> list[str]:
    """One line per accepted change (empty when nothing changed); ConfigError for a refused one.
    Records written before params were stored are compared on objectives and directions only."""
    name = study.study_name
    objectives = [o.key for o in space.objectives]
    stored_objectives = list(stored.get("objectives") or objectives)
    old = list(zip(stored_objectives, [d.name.lower() for d in study.directions]))
    new = list(zip(objectives, space.directions))
    if old != new:
        raise ConfigError(f"--space: study {name!r} was run for {_objectives(old)}, the space asks for "
                          f"{_objectives(new)}; {_FIX}")
    stored_params = stored.get("params")
    if not isinstance(stored_params, Mapping):
        return []
    now = space.distributions()
    added, removed = sorted(set(now) - set(stored_params)), sorted(set(stored_params) - set(now))
    if added or removed:
        what = " and ".join(x for x in (f"adds {', '.join(added)}" if added else "",
                                        f"drops {', '.join(removed)}" if removed else "") if x)
        raise ConfigError(f"--space: params: the space {what} since study {name!r} was run, so its finished trials "
                          f"were launched with other flags; {_FIX}")
    notes = []
    finished = [t for t in trials if t.state.is_finished()]
    for flag, new_dist in now.items():
        old_dist = json_to_distribution(json.dumps(stored_params[flag]))
        if old_dist == new_dist:
            continue
        try:
            check_distribution_compatibility(old_dist, new_dist)
        except ValueError:
            raise ConfigError(f"--space: params.{flag} changed from {_describe(old_dist)} to {_describe(new_dist)} "
                              f"since study {name!r} was run, which Optuna cannot mix; {_FIX}") from None
        outside = sum(1 for t in finished if flag in t.params and not new_dist._contains(new_dist.to_internal_repr(t.params[flag])))
        notes.append(f"params.{flag}: {_describe(old_dist)} → {_describe(new_dist)}; the {len(finished)} finished "
                     f"trial(s) keep their results ({outside} lie outside the new range and are not proposed again)")
    stored_slos = stored.get("slos")
    slos = [s.describe() for s in space.slos]
    if isinstance(stored_slos, list) and stored_slos != slos:
        notes.append(f"slo: {', '.join(stored_slos) or 'none'} → {', '.join(slos) or 'none'}; the finished trials "
                     "keep the constraints they were told with, new trials get the new bounds")
    return notes


def _objectives(pairs: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{key} ({direction})" for key, direction in pairs)


def _describe(d: optuna.distributions.BaseDistribution) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"choices {list(d.choices)}"
    if isinstance(d, (optuna.distributions.IntDistribution, optuna.distributions.FloatDistribution)):
        kind = "int" if isinstance(d, optuna.distributions.IntDistribution) else "float"
        step = f" step {d.step}" if d.step not in (None, 1) else ""
        return f"{kind} [{d.low}, {d.high}]{step}{' log' if d.log else ''}"
    return repr(d)
