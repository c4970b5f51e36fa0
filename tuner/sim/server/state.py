"""State of one simulated server: its requests, the engine driver and shutdown.

A single asyncio driver task runs the Engine: `step()`, sleep the (scaled) forward time
against an absolute deadline (no drift from event-loop overhead), then deliver the emitted
tokens to per-request queues, from which the HTTP handlers stream.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuner.sim.faults import Faults, ProcessTree, scheduler_exception_lines, watchdog_line
from tuner.sim.log import Log

GRACEFUL_POLL_S = 5.0
SETTLE_POLL_S, SETTLE_MAX_S = 0.001, 0.02
OUTPUT_POOL = 4096


class EngineLike(Protocol):
    """What the server needs of `engine.Engine`."""

    def submit(self, req_id: str, prompt_tokens: int, max_new_tokens: int) -> str | None: ...
    def has_work(self) -> bool: ...
    def step(self) -> Any: ...


@dataclass
class PendingRequest:
    """A request in flight: the driver puts (completion tokens, finished) on its queue."""

    rid: str
    prompt_tokens: int
    max_new_tokens: int
    pieces: list[str]
    created: float
    queue: asyncio.Queue[tuple[int, bool]] = field(default_factory=asyncio.Queue)
    user: bool = True


@dataclass(frozen=True)
class ServerInfo:
    """Static facts the info endpoints report."""

    server_args: dict[str, Any]
    served_model_name: str
    tokenizer_path: str
    context_len: int
    max_total_num_tokens: int
    memory_usage: dict[str, float]
    captured_bs: int = 0          # largest decode batch replayed from a CUDA graph
    version: str = "0.7.2"        # the package version the dialect reports
    model_type: str | None = None
    architectures: tuple[str, ...] = ()


class BadRequest(Exception):
    """A request the server refuses; answered with `status` and `message`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class SimServer:
    """Request handling, the engine driver and shutdown for one simulated launch."""

    def __init__(
        self,
        *,
        engine: EngineLike,
        info: ServerInfo,
        tokenizer: Any,
        count_tokens: Callable[[Any, str], int],
        make_output_text: Callable[[Any, int, int], list[str]],
        log: Log,
        tree: ProcessTree,
        time_scale: float,
        faults: Faults,
        seed: int,
        watchdog_timeout_s: float,
    ) -> None:
        self.engine = engine
        self.info = info
        self.tok = tokenizer
        self._count = count_tokens
        self.log = log
        self.tree = tree
        self.scale = time_scale
        self.faults = faults
        self.seed = seed
        self.watchdog_s = watchdog_timeout_s
        self.status = "starting"  # starting | up | shutting_down
        self.reqs: dict[str, PendingRequest] = {}
        self.user_requests = 0
        self._counter = 0
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self.last_emit = 0.0
        self._pool: list[str] = make_output_text(tokenizer, OUTPUT_POOL, seed)
        self._stop: asyncio.Future[str] | None = None
        self.decode_log_interval = max(1, int(info.server_args.get("decode_log_interval") or 40))
        self._decode_steps, self._gen_tokens, self._gen_time = 0, 0, 0.0
        self.last_gen_throughput = 0.0
        self.recorder: Any = None  # the expert-distribution recorder's endpoints (routes.build_app)

    # ----------------------------------------------------------------- lifecycle

    def start_driver(self) -> None:
        self._stop = asyncio.get_running_loop().create_future()
        self._driver = asyncio.create_task(self._drive())

    async def wait_stopped(self) -> str:
        """Resolves with 'sigint' (or another reason) when the server should stop serving."""
        assert self._stop is not None
        return await self._stop

    def request_stop(self, reason: str) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(reason)

    def on_sigterm(self) -> None:
        if self.status == "shutting_down":
            return
        self.log("SIGTERM received. signum=15 frame=None. Draining requests and shutting down...")
        self.status = "shutting_down"
        asyncio.get_running_loop().create_task(self._graceful_exit())

    async def _graceful_exit(self) -> None:
        # sigterm_watchdog checks the flag every 5 s, then reports every 5 s while draining.
        await asyncio.sleep(GRACEFUL_POLL_S * self.scale)
        while True:
            rids = list(self.reqs)
            if os.environ.get("SGL_FORCE_SHUTDOWN", "").lower() in ("1", "true"):
                self.log("Signal SIGTERM received while force shutdown flag set. Force exiting.")
                break
            self.log(
                f"Gracefully exiting... Remaining number of requests {len(rids)}. "
                f"Remaining requests remaining_rids={rids}."
            )
            if not rids:
                break
            await asyncio.sleep(GRACEFUL_POLL_S * self.scale)
        self.tree.die(signal.SIGKILL)

    def fatal(self, lines: Sequence[str]) -> None:
        """A scheduler exception after start-up: SIGQUIT to the launcher, which kills the tree."""
        for i, line in enumerate(lines):
            self.log(line, tp=0) if i == 0 else self.log.raw(line)
        self.log("SIGQUIT received. signum=3, frame=None. It usually means one child failed.")
        self.tree.die(signal.SIGKILL)

    # ----------------------------------------------------------------- engine driver

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                await self._settle()
                self._wake.clear()
                deadline = loop.time()
                while self.engine.has_work() and not self._frozen():
                    result = self.engine.step()
                    duration_s = float(result.duration_s) * (0.5 if self.faults.garbage_output else 1.0)
                    if duration_s > self.watchdog_s:
                        await asyncio.sleep((self.watchdog_s + 5.0) * self.scale)
                        self.fatal([watchdog_line(self.watchdog_s)])
                    # Absolute deadlines: event-loop overhead does not accumulate into the timing.
                    deadline = max(deadline, loop.time() - 0.05) + duration_s * self.scale
                    await asyncio.sleep(max(0.0, deadline - loop.time()))
                    for line in getattr(result, "log_lines", ()):
                        self.log(line, tp=0)
                    self._deliver(result.emitted)
                    if result.fatal:
                        self.fatal(scheduler_exception_lines(str(result.fatal)))
                    self._stats(result, duration_s)
                    if duration_s <= 0 and not result.emitted:
                        break  # nothing admissible now: wait for a new request or an abort
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a simulator bug must not look like a healthy server
            self.fatal(scheduler_exception_lines(traceback.format_exc().rstrip().splitlines()[-1]))

    async def _settle(self) -> None:
        """Let requests sent together join the first forward after idling.

        Client and HTTP overheads (a few ms for a burst of requests) are amplified by
        1/time_scale in simulated time; the real scheduler sees such a burst at once.
        """
        loop = asyncio.get_running_loop()
        end, seen = loop.time() + SETTLE_MAX_S, self._counter
        while loop.time() < end:
            await asyncio.sleep(SETTLE_POLL_S)
            if self._counter == seen:
                return
            seen = self._counter

    def _frozen(self) -> bool:
        """A scheduler that died after start-up: nothing is answered any more (real behaviour)."""
        return self.tree.dead_child() is not None

    def _stats(self, result: Any, duration_s: float) -> None:
        """`Decode batch. ...` every decode_log_interval decode forwards (simulated throughput)."""
        if getattr(result, "kind", "") != "decode":
            return
        self._decode_steps += 1
        self._gen_tokens += len(result.emitted)
        self._gen_time += duration_s
        if self._decode_steps % self.decode_log_interval:
            return
        used = getattr(self.engine, "kv_used", 0)
        cap = max(1, self.info.max_total_num_tokens)
        throughput = self._gen_tokens / self._gen_time if self._gen_time > 0 else 0.0
        self._gen_tokens, self._gen_time = 0, 0.0
        self.last_gen_throughput = throughput
        running = getattr(self.engine, "num_running", len(result.emitted))
        graph = 0 < len(result.emitted) <= self.info.captured_bs
        self.log(
            f"Decode batch, #running-req: {running}, "
            f"#token: {used}, token usage: {used / cap:.2f}, cuda graph: {graph}, "
            f"gen throughput (token/s): {throughput:.2f}, #queue-req: {getattr(self.engine, 'num_waiting', 0)}, ",
            tp=0,
        )

    def _deliver(self, emitted: Sequence[tuple[str, int, bool]]) -> None:
        if emitted:
            self.last_emit = time.monotonic()
        for rid, tokens, finished in emitted:
            req = self.reqs.get(rid)
            if req is not None:
                req.queue.put_nowait((int(tokens), bool(finished)))

    def submit(self, prompt_tokens: int, max_new_tokens: int, rid: str | None, *, user: bool) -> PendingRequest:
        self._counter += 1
        rid = rid or uuid.uuid4().hex
        if rid in self.reqs:
            raise BadRequest(f"Duplicate request ID: {rid}")
        req = PendingRequest(rid, prompt_tokens, max_new_tokens, self._pieces(max_new_tokens), time.monotonic(),
                             user=user)
        err = self.engine.submit(rid, prompt_tokens, max_new_tokens)
        if err:
            raise BadRequest(err)
        if user and self.recorder is not None:
            self.recorder.on_submit(prompt_tokens, max_new_tokens)
        self.reqs[rid] = req
        self._wake.set()
        return req

    def _pieces(self, count: int) -> list[str]:
        """Output pieces (one non-empty piece per token): a seeded rotation of one shared pool,
        since generating text per request costs milliseconds that 1/time_scale amplifies."""
        pool = self._pool
        if self.faults.garbage_output:
            return [pool[0]] * count
        if self.faults.empty_output:
            return [""] * count
        start = random.Random(self.seed * 1_000_003 + self._counter).randrange(len(pool))
        return [pool[(start + i) % len(pool)] for i in range(count)]

    def release(self, req: PendingRequest) -> None:
        self.reqs.pop(req.rid, None)
        abort = getattr(self.engine, "abort", None)
        if abort is not None:
            try:
                abort(req.rid)
            except Exception:  # noqa: BLE001 - finished requests may be unknown to the engine
                pass

    async def tokens(self, req: PendingRequest) -> AsyncIterator[tuple[str, int, bool]]:
        """Yield (cumulative_text, completion_tokens, finished) as the driver delivers."""
        text, done = "", 0
        while True:
            n, finished = await req.queue.get()
            n = min(max(n, done), req.max_new_tokens)
            text += "".join(req.pieces[done:n])
            done = n
            yield text, done, finished
            if finished:
                return

    # ----------------------------------------------------------------- request parsing

    def admit(self, prompt_tokens: int, max_new_tokens: int) -> None:
        ctx = self.info.context_len
        if prompt_tokens >= ctx:
            raise BadRequest(
                f"The input ({prompt_tokens} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        if prompt_tokens + max_new_tokens > ctx and not self.info.server_args.get("allow_auto_truncate"):
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
                f"You requested a total of {prompt_tokens + max_new_tokens} tokens: {prompt_tokens} tokens "
                f"from the input messages and {max_new_tokens} tokens for the completion. Please reduce "
                "the number of tokens in the input messages or the completion to fit within the limit."
            )

    def count_user_request(self) -> None:
        if self.status == "up":
            self.user_requests += 1
            limit = self.faults.crash_after
            if limit is not None and self.user_requests > limit:
                self.fatal(scheduler_exception_lines("RuntimeError: CUDA error: an illegal memory access was encountered"))

    def prompt_len(self, text: Any, input_ids: Any) -> int:
        if input_ids is not None:
            if not isinstance(input_ids, list) or not all(isinstance(t, int) for t in input_ids):
                raise BadRequest("input_ids must be a list of token ids")
            return len(input_ids)
        if isinstance(text, str):
            return self._count(self.tok, text)
        raise BadRequest("Either text or input_ids should be provided.")
