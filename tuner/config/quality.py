"""The `quality:` section of a space: which prompts the output-quality guard sends and the
thresholds it judges the replies by. The check itself is in :mod:`tuner.trial.quality`."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tuner.errors import ConfigError

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The three primary colors of light are",
    "Question: What is 17 multiplied by 3?\nAnswer:",
    'def is_prime(n):\n    """Return True if n is a prime number."""\n',
    "Write one sentence about the ocean:\n",
)
DEFAULT_REFERENCE_TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air "
    "pressure is lower, so water boils at a lower temperature and food takes longer to cook. "
    "Mountain climbers often carry pressure cookers for this reason. The same principle "
    "explains why a sealed container can keep a liquid above its normal boiling point: the "
    "pressure inside keeps the molecules from escaping as vapor. Power plants use this effect "
    "when they heat water under high pressure before it turns into the steam that drives "
    "their turbines."
)


@dataclass(frozen=True)
class QualitySpec:
    """The `quality:` section of a space (every key optional)."""

    enabled: bool = True
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 32
    timeout_s: float = 300.0
    min_distinct_ratio: float = 0.25
    max_repeat_fraction: float = 0.6
    max_bad_fraction: float = 0.25
    check_logprobs: bool = True
    reference_text: str = DEFAULT_REFERENCE_TEXT
    max_logprob_drop: float = 0.2

    @classmethod
    def from_space(cls, space: Any) -> QualitySpec:
        """Read ``space.quality`` defensively: absent/None, a mapping, or an object with
        attributes of these names. Raises ConfigError naming a bad key or value."""
        raw = getattr(space, "quality", None)
        if raw is None:
            return cls()
        if isinstance(raw, QualitySpec):
            return raw
        names = [f.name for f in fields(cls)]
        if isinstance(raw, Mapping):
            unknown = sorted(set(raw) - set(names))
            if unknown:
                raise ConfigError(f"quality.{unknown[0]}: unknown key; use one of: {', '.join(names)}")
            values = dict(raw)
        else:
            values = {n: getattr(raw, n) for n in names if getattr(raw, n, None) is not None}
        return cls.build(values)

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> QualitySpec:
        base = cls()
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values or values[f.name] is None:
                continue
            v, default, where = values[f.name], getattr(base, f.name), f"quality.{f.name}"
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ConfigError(f"{where}: must be true or false, got {v!r}; set true or false")
            elif isinstance(default, tuple):
                if isinstance(v, str) or not isinstance(v, Sequence) or not v or \
                        not all(isinstance(p, str) and p.strip() for p in v):
                    raise ConfigError(f"{where}: must be a non-empty list of non-empty strings; list a few prompts")
                v = tuple(v)
            elif isinstance(default, str):
                if not isinstance(v, str) or len(v.split()) < 5:
                    raise ConfigError(f"{where}: must be a text of at least 5 words, got {v!r}; write a plain paragraph")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ConfigError(f"{where}: must be a number ≥ 0, got {v!r}; fix the value")
                if isinstance(default, int) and (not isinstance(v, int) or v < 1):
                    raise ConfigError(f"{where}: must be an integer ≥ 1, got {v!r}; fix the value")
                if f.name.endswith(("_ratio", "_fraction")) and v > 1:
                    raise ConfigError(f"{where}: must be within [0, 1], got {v!r}; fix the value")
                if f.name == "timeout_s" and v == 0:
                    raise ConfigError(f"{where}: must be > 0; give the server time to answer")
            out[f.name] = v
        return cls(**out)

    def request_count(self) -> int:
        """How many generate requests one check sends (a simulator counts them)."""
        return len(self.prompts) + (1 if self.check_logprobs else 0)

    def fingerprint(self) -> str:
        """Identifies what was asked: a reference is only comparable under the same one."""
        payload = json.dumps([list(self.prompts), self.max_new_tokens, self.reference_text])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

