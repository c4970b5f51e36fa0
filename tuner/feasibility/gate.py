"""The study's view of feasibility (:class:`FeasibilityGate`): model sizes and hardware resolved
once per study, one check per proposal, `auto` values filled in before a launch, and the memory
model corrected from what launched servers really reported (stored in the study so resumed runs
keep it)."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.config import AUTO, ParamSpec, SearchSpace
from tuner.feasibility.anchor import anchor_from_observed, calibrate_from_log
from tuner.feasibility.calibration import MemoryCalibration, calibration_from_state
from tuner.feasibility.check import FeasibilityReport, check, max_gpu_experts
from tuner.feasibility.plan import auto_max_total_tokens, resolve_launch
from tuner.machine import Hardware, ModelSizes, load_model_sizes, resolve_hardware
from tuner.outcome import is_memory_reason
from tuner.server import runtime_oom

# Failures that mean "the memory model was too optimistic" when the config was predicted to fit.
MARGIN_STEP_GB = 1.0  # the unanchored margin grows by this after such a failure
ANCHOR_STEP_GB = 0.25  # beyond the failed config's predicted slack, so it no longer fits
INSIDE_MARGIN_STEP_GB = 0.1  # beyond the slack of a failed launch inside the margin, so it no longer fits there
DEFAULT_MARGIN_GB = 2.0


@dataclass
class FeasibilityGate:
    """One study's feasibility: the model, hardware and workloads it checks against, and the
    margin and calibration it learns as launches are observed."""

    model: ModelSizes
    hardware: Hardware
    workloads: list[tuple[int, int, int]]
    margin_gb: float = DEFAULT_MARGIN_GB
    calibration: MemoryCalibration = field(default_factory=MemoryCalibration)
    last_binding: str | None = None
    # Launches that fit only with lower activations (FeasibilityReport.fits_with_lower_activations)
    # run only at this chunk or below: the smallest the space offers, where such a launch is likeliest
    # to survive. None: any chunk.
    test_chunk: int | None = None

    @classmethod
    def for_space(cls, space: SearchSpace) -> FeasibilityGate:
        args = space.server.args
        model_path = args.get("model-path", args.get("model"))
        model = load_model_sizes(str(model_path), space.model or None)
        hw = resolve_hardware(space.hardware or None)
        workloads = [(w.num_prompts, w.input_len, w.output_len) for w in space.workloads]
        return cls(model=model, hardware=hw, workloads=workloads, test_chunk=_smallest_chunk(space))

    def resolve_auto(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        """``flags`` with ``max-total-tokens: auto`` sized from the workloads."""
        out = dict(flags)
        if out.get("max-total-tokens") == AUTO:
            out["max-total-tokens"] = auto_max_total_tokens(self.model, self.hardware, out, self.workloads)
        return out

    def check(self, flags: Mapping[str, Any]) -> FeasibilityReport:
        """:func:`tuner.feasibility.check.check` with this study's margin and calibration."""
        report = check(self.model, self.hardware, flags, self.workloads, margin_gb=self.margin_gb,
                       calibration=self.calibration)
        if not report.feasible:
            self.last_binding = report.binding
        return report

    def largest_gpu_experts(self, flags: Mapping[str, Any]) -> tuple[int, str]:
        """The largest kt-num-gpu-experts whose memory fits with the other flags as given (this
        study's margin and calibration), and the settings that bound holds at: the one answer
        `kttune init` and `kttune plan` both print, since the bound moves with the chunk and the
        running requests."""
        n = max_gpu_experts(self.model, self.hardware, flags, self.workloads, margin_gb=self.margin_gb,
                            calibration=self.calibration)
        plan = resolve_launch(self.model, self.hardware, flags, self.workloads)
        running = plan.max_running if plan.max_running is not None else "unset"
        return n, f"chunked-prefill-size {plan.chunk}, max-running-requests {running}"

    def find_fitting(self, space: SearchSpace, *, samples: int = 256, seed: int = 0) -> FeasibilityReport:
        """Look for any configuration of the space that fits (baseline first, then random
        draws). Returns a fitting report, or the least-violating one if none fits."""
        rng = random.Random(seed)
        candidates = [dict(space.baseline)] if space.baseline else []
        for _ in range(samples):
            candidates.append({p.flag: _draw(p, rng) for p in space.params})
        best: tuple[float, FeasibilityReport] | None = None
        for params in candidates:
            report = check(self.model, self.hardware, launch_flags(space, params, self),
                           self.workloads, margin_gb=self.margin_gb, calibration=self.calibration)
            if report.feasible:
                return report
            excess = sum(v for v in report.constraints.values() if v > 0)
            if best is None or excess < best[0]:
                best = (excess, report)
        assert best is not None
        return best[1]

    def summary(self, report: FeasibilityReport) -> str:
        """One line: the binding constraint, by how much, and the smallest fix."""
        if report.feasible:
            return "fits"
        b = report.binding or "?"
        return f"{b} over by {report.constraints.get(b, float('nan')):.3g}; {report.fix_hint()}"

    def observe(self, log_text: str, flags: Mapping[str, Any], reason: str | None, predicted_fit: bool,
                inside_margin: bool = False, read_back: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Anchor the memory model on what a launched server logged (see
        :func:`tuner.feasibility.anchor.anchor_from_observed`). A config that was predicted to fit but
        failed for memory tightens it: a run-time OOM bounds the activations from below; any
        other memory failure (or one the bound does not explain) grows the anchored margin
        until that config no longer fits, and the unanchored margin by a step. A launch
        `inside_margin` (see :meth:`inside_margin`) that failed for memory adds just enough to
        the anchored margin that it no longer fits there. ``read_back``: the server-info
        endpoint's memory figures (:attr:`tuner.trial.TrialRun.read_back`), which win over the log's.
        Returns the state to store (see `state`)."""
        observed = calibrate_from_log(log_text, read_back)
        oom_after_ready = runtime_oom(log_text)
        memory_failure = is_memory_reason(reason) or oom_after_ready
        if observed.get("weights_gb") is not None:
            tokens = self._forward_tokens(flags, full_only=not oom_after_ready)
            self.calibration = anchor_from_observed(
                observed, self.model, self.hardware, flags, base=self.calibration,
                full_chunk_tokens=tokens if (reason is None or oom_after_ready) else 0, runtime_oom=oom_after_ready)
        if memory_failure and inside_margin and not predicted_fit and self.calibration.free_before_weights_gb is not None:
            after = self.check(flags)
            slack = after.slack_with_lower_activations_gb if self._testable(after) else after.slack_without_margin_gb
            if self.inside_margin(after) and slack is not None and slack >= 0:
                self.calibration = dataclasses.replace(
                    self.calibration, anchor_extra_gb=self.calibration.anchor_extra_gb + slack + INSIDE_MARGIN_STEP_GB)
        if memory_failure and predicted_fit:
            self.margin_gb += MARGIN_STEP_GB
            report = self.check(flags)
            if report.feasible and self.calibration.free_before_weights_gb is not None:
                slack = -max(report.constraints.get(k, 0.0) for k in ("gpu_mem_startup_gb", "gpu_mem_runtime_gb"))
                grow = max(slack, 0.0) + ANCHOR_STEP_GB
                difference = report.breakdown_gb.get("anchor_spread", 0.0)
                cal = self.calibration
                if difference > 0 and cal.anchor_difference_share + grow / difference <= 1.0:
                    # The observed reference still holds; trust the model's differences from it less.
                    self.calibration = dataclasses.replace(
                        cal, anchor_difference_share=cal.anchor_difference_share + grow / difference)
                else:
                    self.calibration = dataclasses.replace(cal, anchor_extra_gb=cal.anchor_extra_gb + grow)
        return self.state()

    def allows(self, report: FeasibilityReport, inside_margin_failures_left: int) -> bool:
        """Whether a proposal may launch: it fits, or it fits inside the margin while failed
        launches there are still allowed."""
        return report.feasible or (self.inside_margin(report) and inside_margin_failures_left > 0)

    def inside_margin(self, report: FeasibilityReport) -> bool:
        """A launch inside the margin, which tests the memory model: not feasible, but it fits
        without the safety margin, or fits there with activations below their estimate (at
        `test_chunk` or below only)."""
        return not report.feasible and (report.fits_without_margin
                                        or (report.fits_with_lower_activations and self._testable(report)))

    def _testable(self, report: FeasibilityReport) -> bool:
        """Whether a launch that fits only with lower activations may test them: at `test_chunk` or below."""
        return self.test_chunk is None or (report.plan is not None and report.plan.chunk <= self.test_chunk)

    def _forward_tokens(self, flags: Mapping[str, Any], *, full_only: bool) -> int:
        """Tokens of the largest prefill forward the benchmark ran: the chunk when the workloads
        queue enough prompt tokens to fill it (twice over when ``full_only``), else 0."""
        plan = resolve_launch(self.model, self.hardware, flags, self.workloads)
        queued = max((min(n, plan.max_running or n) * i for n, i, _ in self.workloads), default=0)
        if plan.chunk <= 0:
            return 0
        if full_only:
            return plan.chunk if queued >= 2 * plan.chunk else 0
        return min(plan.chunk, queued)

    def state(self) -> dict[str, Any]:
        """What the study stores to resume with: the margin and the calibration, by field name."""
        return {"margin_gb": self.margin_gb, "calibration": dataclasses.asdict(self.calibration)}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Resume from :meth:`state` (also one saved under earlier calibration field names)."""
        if not state:
            return
        self.margin_gb = float(state.get("margin_gb", self.margin_gb))
        self.calibration = calibration_from_state(dict(state.get("calibration") or {}))


def _smallest_chunk(space: SearchSpace) -> int | None:
    """The smallest positive chunked-prefill-size the space offers; None when it does not search it."""
    p = next((p for p in space.params if p.flag == "chunked-prefill-size"), None)
    if p is None:
        return None
    values = [v for v in (p.choices if p.choices is not None else [p.low]) if isinstance(v, (int, float)) and v > 0]
    return int(min(values)) if values else None


def _draw(p: ParamSpec, rng: random.Random) -> Any:
    """A uniform draw of one parameter."""
    if p.choices is not None:
        return rng.choice(p.choices)
    assert p.low is not None and p.high is not None
    if p.is_float:
        return rng.uniform(p.low, p.high)
    step = int(p.step or 1)
    return int(p.low) + step * rng.randrange(int((p.high - p.low) // step) + 1)


def launch_flags(space: SearchSpace, params: Mapping[str, Any], gate: FeasibilityGate | None, *,
                 expert_location: str | None = None) -> dict[str, Any]:
    """The flags a proposal launches with: the space's fixed args with the params on top
    (`SearchSpace.launch_flags`: tuned environment variables under ``env:NAME`` keys, the
    study's recorded expert distribution for `frequency` placement), `auto` values sized by
    the gate where there is one."""
    flags = space.launch_flags(params, expert_location=expert_location)
    return gate.resolve_auto(flags) if gate is not None else flags
