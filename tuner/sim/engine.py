"""Continuous-batching scheduler emulation (FCFS admission against a KV reservation, chunked
prefill, decode, retraction when the KV pool is full) and a virtual-time benchmark.

`Engine` has no clock: `step()` runs one forward and says how long it took, so the same class
drives a live HTTP server (sleep duration_s x time_scale, then deliver) and `run_workload`.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from tuner.errors import InfeasibleConfig
from tuner.sim.perfmodel.config import SimConfig
from tuner.sim.perfmodel.startup import StartupResult, runtime_oom, startup_check
from tuner.sim.perfmodel.steptime import StepModel
from tuner.sim.scenario import Scenario

# Per-step log-jitter a*Z + b*(Exp-1), fitted so that at sigma=0.025 the ITL P95/median = 1.053
# and P99/median = 1.084, the ratios of the seed decode benchmark (840.06 and 864.96 ms over a
# median of 797.89 ms in kvcache-ai/ktransformers doc/en/Kimi-K2-Thinking.md).
_JITTER_A, _JITTER_B, _SIGMA_REF = 0.0235, 0.0175, 0.025
_RATIO_RECOVERY_STEPS = 100     # decode steps for the reservation ratio to fall back after a retraction


class StepTimes(Protocol):
    """What the engine asks of its step-time model: `StepModel`, or a stand-in that records forwards."""

    def decode(self, batch: int, ctx_tokens: float) -> float: ...

    def prefill(self, q_tokens: int, ctx_tokens: float = 0.0) -> float: ...


@dataclass(frozen=True)
class StepResult:
    duration_s: float
    emitted: list[tuple[str, int, bool]]      # (req_id, cumulative completion tokens, finished)
    fatal: str | None = None                  # runtime failure: the server must die
    log_lines: tuple[str, ...] = ()
    kind: str = "idle"                        # "prefill", "decode" or "idle"


@dataclass
class _Req:
    rid: str
    prompt: int
    max_new: int
    target: int                 # tokens to prefill: prompt, plus output so far after a retraction
    prefilled: int = 0
    generated: int = 0
    decode_steps: int = 0       # KV slots written by decode forwards since the last prefill
    admitted_at: int = 0

    @property
    def kv(self) -> int:
        return self.prefilled + self.decode_steps

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.target


class Engine:
    """One simulated sglang-kt server: FCFS admission, chunked prefill, decode, retraction."""

    def __init__(self, scenario: Scenario, cfg: SimConfig, *, noise_sigma: float = 0.025,
                 seed: int = 0) -> None:
        self.scenario, self.cfg = scenario, cfg
        self.startup: StartupResult = startup_check(
            scenario, cfg, fuzz_seed=seed if noise_sigma > 0 else None)
        if not self.startup.ok or self.startup.config is None:
            raise InfeasibleConfig(f"server fails at startup stage {self.startup.stage!r}: "
                                   + " | ".join(self.startup.error_lines))
        self.rc = self.startup.config
        self.kv_tokens = self.startup.kv_tokens
        self.max_running = self.startup.max_running_requests
        self.chunk = self.rc.chunk
        self._model: StepTimes = StepModel.build(scenario, self.rc,
                                                 captured_bs=min(self.rc.graph_max_bs, self.max_running))
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._live: set[str] = set()
        self._admissions = 0
        self._ratio_init = scenario.c("kv_new_token_ratio")
        self._ratio = self._ratio_init
        self.fatal: str | None = None
        self._sigma = max(0.0, noise_sigma)
        self._rng = random.Random(f"engine/{seed}")
        self.run_multiplier = 1.0
        if self._sigma > 0:
            self.run_multiplier = math.exp(self._rng.gauss(0.0, self._sigma))
            if self._rng.random() < scenario.c("slow_run_prob"):
                self.run_multiplier *= self._rng.uniform(1.05, 1.15)

    # -- public state -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_used(self) -> int:
        return sum(r.kv for r in self._running)

    def has_work(self) -> bool:
        return self.fatal is None and bool(self._waiting or self._running)

    def submit(self, req_id: str, prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Queue a request; return an error text instead if it can never be served."""
        if req_id in self._live:
            return f"Duplicate request id {req_id!r}."
        if prompt_tokens < 1 or max_new_tokens < 1:
            return (f"prompt_tokens and max_new_tokens must be >= 1, got {prompt_tokens} and "
                    f"{max_new_tokens}.")
        total = prompt_tokens + max_new_tokens
        if total > self.rc.context_len:
            return (f"Requested token count exceeds the model's maximum context length of "
                    f"{self.rc.context_len} tokens. You requested a total of {total} tokens: "
                    f"{prompt_tokens} tokens from the input and {max_new_tokens} for the completion.")
        if total > self.kv_tokens:
            # sglang's scheduler refuses it in these words (python/sglang/srt/managers/utils.py,
            # validate_input_length); the simulator counts the output tokens in too.
            return (f"Input length ({total} tokens) exceeds the maximum allowed length ({self.kv_tokens} tokens). "
                    "Use a shorter input or enable --allow-auto-truncate.")
        self._live.add(req_id)
        self._waiting.append(_Req(req_id, prompt_tokens, max_new_tokens, prompt_tokens))
        return None

    def abort(self, req_id: str) -> bool:
        """Drop a queued or running request (client gone); False if it is not live."""
        if req_id not in self._live:
            return False
        self._live.discard(req_id)
        self._waiting = deque(r for r in self._waiting if r.rid != req_id)
        self._running = [r for r in self._running if r.rid != req_id]
        return True

    # -- scheduling ----------------------------------------------------------------------
    def _reservation(self, r: _Req) -> float:
        return r.target + r.decode_steps + self._ratio * (r.max_new - r.generated)

    def _plan_prefill(self, budget: int) -> list[tuple[_Req, int]]:
        """Pick (request, tokens) segments: the partial request first, then FCFS admissions."""
        segments: list[tuple[_Req, int]] = []
        partial = next((r for r in self._running if not r.decoding), None)
        if partial is not None:
            take = min(partial.target - partial.prefilled, budget)
            segments.append((partial, take))
            budget -= take
        reserved = sum(self._reservation(r) for r in self._running)
        n_running = len(self._running)
        for r in self._waiting:
            if budget <= 0 or n_running >= self.max_running:
                break
            need = self._reservation(r)
            if reserved + need > self.kv_tokens:
                break
            take = min(r.target, budget)
            segments.append((r, take))
            reserved += need
            n_running += 1
            budget -= take
        return segments

    def _retract(self, needed: int) -> list[str]:
        logs: list[str] = []
        while self.kv_used + needed > self.kv_tokens:
            victims = [r for r in self._running if r.decoding]
            if not victims:
                break
            victim = max(victims, key=lambda r: r.admitted_at)
            self._running.remove(victim)
            victim.target, victim.prefilled, victim.decode_steps = \
                victim.prompt + victim.generated, 0, 0
            self._waiting.appendleft(victim)
            needed -= 1
            self._ratio = 1.0
            logs.append(f"KV cache pool is full. Retract requests. #retracted_reqs: 1, "
                        f"#new_token_ratio: {self._ratio_init:.4f} -> {self._ratio:.4f}")
        return logs

    def _noise(self) -> float:
        if self._sigma <= 0:
            return 1.0
        scale = self._sigma / _SIGMA_REF
        gauss, expo = self._rng.gauss(0.0, 1.0), self._rng.expovariate(1.0)
        return self.run_multiplier * math.exp(scale * (_JITTER_A * gauss + _JITTER_B * (expo - 1.0)))

    def step(self) -> StepResult:
        """Run one forward (prefill chunk or decode step); tokens are due when it ends."""
        if self.fatal is not None:
            return StepResult(0.0, [], self.fatal)
        decoders = [r for r in self._running if r.decoding]
        riders = decoders if self.rc.mixed_chunk else []
        budget = self.chunk - len(riders)
        segments = self._plan_prefill(budget) if budget > 0 else []
        if segments:
            logs: list[str] = []
            if riders:
                logs = self._retract(len(riders))
                riders = [r for r in riders if r in self._running]
            return self._prefill(segments, riders, logs)
        if decoders:
            return self._decode()
        return StepResult(0.0, [])

    def _prefill(self, segments: list[tuple[_Req, int]], riders: list[_Req],
                 logs: list[str]) -> StepResult:
        q_tokens = sum(t for _, t in segments) + len(riders)
        oom = runtime_oom(self.scenario, self.rc, q_tokens, self.startup)
        if oom is not None:
            self.fatal = oom
            return StepResult(0.0, [], oom, kind="prefill")
        attended = sum(t * (r.prefilled + t / 2) for r, t in segments) + sum(r.kv for r in riders)
        duration = self._model.prefill(q_tokens, attended / q_tokens) * self._noise()
        if (isinstance(self._model, StepModel) and not self._model.updated and self.rc.updated_routing is not None
                and q_tokens >= self.rc.layerwise_threshold):  # dynamic update re-picked the GPU experts
            self._model = replace(self._model, updated=True)
        emitted: list[tuple[str, int, bool]] = []
        for r, take in segments:
            if r not in self._running:
                self._waiting.remove(r)
                self._admissions += 1
                r.admitted_at = self._admissions
                self._running.append(r)
            r.prefilled += take
            if r.decoding:
                emitted.append(self._emit(r))
        for r in riders:
            r.decode_steps += 1
            emitted.append(self._emit(r))
        self._drop_finished()
        return StepResult(duration, emitted, log_lines=tuple(logs), kind="prefill")

    def _decode(self) -> StepResult:
        logs = self._retract(sum(1 for r in self._running if r.decoding))
        batch = [r for r in self._running if r.decoding]
        if not batch:
            return StepResult(0.0, [], log_lines=tuple(logs), kind="decode")
        ctx = sum(r.kv for r in batch) / len(batch)
        duration = self._model.decode(len(batch), ctx) * self._noise()
        emitted = []
        for r in batch:
            r.decode_steps += 1
            emitted.append(self._emit(r))
        self._drop_finished()
        if self._ratio > self._ratio_init:
            self._ratio = max(self._ratio_init,
                              self._ratio - (1.0 - self._ratio_init) / _RATIO_RECOVERY_STEPS)
        return StepResult(duration, emitted, log_lines=tuple(logs), kind="decode")

    def _emit(self, r: _Req) -> tuple[str, int, bool]:
        r.generated += 1
        return (r.rid, r.generated, r.generated >= r.max_new)

    def _drop_finished(self) -> None:
        for r in self._running:
            if r.generated >= r.max_new:
                self._live.discard(r.rid)
        self._running = [r for r in self._running if r.generated < r.max_new]


@dataclass(frozen=True)
class WorkloadResult:
    """The metrics bench_serving would report (times in ms, throughputs in tok/s)."""

    duration: float
    completed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    p95_itl_ms: float
    p99_itl_ms: float
    max_itl_ms: float
    mean_tpot_ms: float
    mean_e2e_latency_ms: float
    concurrency: float
    fatal: str | None = None
    errors: tuple[str, ...] = field(default=())


def _failed(fatal: str) -> WorkloadResult:
    """A run that produced nothing: every count, rate and latency 0."""
    return WorkloadResult(0.0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                          fatal=fatal)


def _drive(engine: Engine, clock_s: float, times: dict[str, list[float]]) -> tuple[float, str | None]:
    """Step until idle; append each token's arrival time; return the clock and any fatal."""
    while engine.has_work():
        res = engine.step()
        clock_s += res.duration_s
        if res.fatal:
            return clock_s, res.fatal
        if res.duration_s <= 0 and not res.emitted:
            return clock_s, "scheduler stalled: queued requests can never be admitted"
        for rid, _, _ in res.emitted:
            times.setdefault(rid, []).append(clock_s)
    return clock_s, None


def run_workload(scenario: Scenario, cfg: SimConfig, *, num_prompts: int, input_len: int,
                 output_len: int, noise_sigma: float = 0.0, seed: int = 0,
                 warmup: bool = True) -> WorkloadResult:
    """Virtual-time bench_serving run: fixed lengths, request rate inf (all sent at t=0)."""
    try:
        engine = Engine(scenario, cfg, noise_sigma=noise_sigma, seed=seed)
    except InfeasibleConfig as exc:
        return _failed(str(exc))
    if warmup:   # bench_serving re-sends prompt 0 with at most 32 output tokens before timing
        err = engine.submit("warmup", input_len, min(output_len, 32))
        if err:
            return _failed(f"Warmup failed: {err}")
        _, fatal = _drive(engine, 0.0, {})
        if fatal:
            return _failed(fatal)
    errors: list[str] = []
    for i in range(num_prompts):
        err = engine.submit(f"req-{i}", input_len, output_len)
        if err:
            errors.append(err)
    times: dict[str, list[float]] = {}
    duration, fatal = _drive(engine, 0.0, times)
    done = [ts for ts in times.values() if len(ts) >= output_len]
    ttft = [ts[0] for ts in done]
    itl = [b - a for ts in done for a, b in zip(ts, ts[1:])]
    e2e = [ts[-1] for ts in done]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in done if len(ts) > 1]
    n_in, n_out = input_len * len(done), sum(len(ts) for ts in done)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)

    def ms(values: list[float], q: float | None = None) -> float:
        arr = np.asarray(values or [0.0]) * 1000
        return float(np.mean(arr) if q is None else np.percentile(arr, q))

    return WorkloadResult(
        duration=duration, completed=len(done), total_input_tokens=n_in,
        total_output_tokens=n_out, request_throughput=rate(len(done)),
        input_throughput=rate(n_in), output_throughput=rate(n_out),
        mean_ttft_ms=ms(ttft), median_ttft_ms=ms(ttft, 50), p99_ttft_ms=ms(ttft, 99),
        mean_itl_ms=ms(itl), median_itl_ms=ms(itl, 50), p95_itl_ms=ms(itl, 95),
        p99_itl_ms=ms(itl, 99), max_itl_ms=ms(itl, 100), mean_tpot_ms=ms(tpot),
        mean_e2e_latency_ms=ms(e2e), concurrency=rate(sum(e2e)), fatal=fatal,
        errors=tuple(errors))
