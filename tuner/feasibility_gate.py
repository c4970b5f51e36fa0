"""The study's view of feasibility: model sizes and hardware resolved once per study, one
check per proposal, and the `auto` values (max-total-tokens) filled in before a launch."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.feasibility import FeasibilityReport, auto_max_total_tokens, check
from tuner.hardware import Hardware, resolve_hardware
from tuner.model import ModelSizes, load_model_sizes
from tuner.space import AUTO, SearchSpace


@dataclass
class FeasibilityGate:
    model: ModelSizes
    hardware: Hardware
    workloads: list[tuple[int, int, int]]
    margin_gb: float = 2.0
    last_binding: str | None = None

    @classmethod
    def for_space(cls, space: SearchSpace) -> FeasibilityGate:
        args = space.server.args
        model_path = args.get("model-path", args.get("model"))
        model = load_model_sizes(str(model_path), space.model or None)
        hw = resolve_hardware(space.hardware or None)
        workloads = [(w.num_prompts, w.input_len, w.output_len) for w in space.workloads]
        return cls(model=model, hardware=hw, workloads=workloads)

    def resolve_auto(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(flags)
        if out.get("max-total-tokens") == AUTO:
            out["max-total-tokens"] = auto_max_total_tokens(self.model, self.hardware, out, self.workloads)
        return out

    def check(self, flags: Mapping[str, Any]) -> FeasibilityReport:
        report = check(self.model, self.hardware, flags, self.workloads, margin_gb=self.margin_gb)
        if not report.feasible:
            self.last_binding = report.binding
        return report

    def summary(self, report: FeasibilityReport) -> str:
        """One line: the binding constraint, by how much, and the smallest fix."""
        if report.feasible:
            return "fits"
        b = report.binding or "?"
        return f"{b} over by {report.constraints.get(b, float('nan')):.3g}; {report.fix_hint()}"
