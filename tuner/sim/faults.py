"""Injected faults for the simulated server (`--sim-fault` / KTTUNE_SIM_FAULT).

Comma-separated switches, e.g. `slow_start=30,crash_after=5`:

| switch | effect |
|---|---|
| `crash_at_start` | TP0 scheduler dies natively during weight loading (real text: `Rank 0 scheduler is dead`) |
| `hang_at_start` | loading never finishes: no more lines, never binds, never ready |
| `slow_start=S` | S extra simulated seconds of weight loading |
| `crash_after=N` | the (N+1)-th user generate request kills the server (server warmup and /health excluded) |
| `port_in_use` | behave as if the HTTP bind failed after the full load |
| `garbage_output` | degenerate text (one token repeated) produced at twice the speed |
"""
from __future__ import annotations

from dataclasses import dataclass

KNOWN = ("crash_at_start", "hang_at_start", "slow_start", "crash_after", "port_in_use", "garbage_output")


@dataclass(frozen=True)
class Faults:
    crash_at_start: bool = False
    hang_at_start: bool = False
    slow_start_s: float = 0.0
    crash_after: int | None = None
    port_in_use: bool = False
    garbage_output: bool = False

    @property
    def any(self) -> bool:
        return self != Faults()


def parse_faults(spec: str) -> Faults:
    """Parse `a,b=1,...`; raises ValueError naming the bad item and the known switches."""
    fields: dict[str, object] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        value = value.strip()
        if name not in KNOWN:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(KNOWN)}")
        if name == "slow_start":
            fields["slow_start_s"] = _number(name, value, float)
        elif name == "crash_after":
            fields["crash_after"] = _number(name, value, int)
        elif value:
            raise ValueError(f"fault {name!r} takes no value, got {value!r}")
        else:
            fields[name] = True
    return Faults(**fields)  # type: ignore[arg-type]


def _number(name: str, value: str, kind: type) -> float | int:
    try:
        out = kind(value)
    except ValueError:
        raise ValueError(f"fault {name!r} needs a {kind.__name__} value (e.g. {name}=5), got {value!r}") from None
    if out < 0:
        raise ValueError(f"fault {name!r} must be >= 0, got {value!r}")
    return out
