"""HTTP side of the simulated server: SGLang's endpoints over one simulated scheduler.

A single asyncio driver task runs the Engine: `step()`, sleep the (scaled) forward time
against an absolute deadline (no drift from event-loop overhead), then deliver the emitted
tokens to per-request queues. Handlers stream cumulative text like `/generate` does.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from aiohttp import web

from tuner.sim.faults import Faults, ProcessTree, scheduler_exception_lines, watchdog_line

VERSION = "0.7.2"
DEFAULT_MAX_NEW_TOKENS = 128
GRACEFUL_POLL_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 20.0
SETTLE_POLL_S, SETTLE_MAX_S = 0.001, 0.02
OUTPUT_POOL = 4096


class Log:
    """SGLang-style lines (`[YYYY-mm-dd HH:MM:SS] msg`, scheduler lines with ` TP0`) on stderr."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr

    def __call__(self, msg: str, *, tp: int | None = None) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        rank = f" TP{tp}" if tp is not None else ""
        self._write(f"[{stamp}{rank}] {msg}")

    def uvicorn(self, level: str, msg: str) -> None:
        """uvicorn's format as sglang configures it: `[ts] INFO:     msg`."""
        self._write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {(level + ':').ljust(9)} {msg}")

    def raw(self, text: str) -> None:
        self._write(text)

    def _write(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


class EngineLike(Protocol):
    def submit(self, req_id: str, prompt_tokens: int, max_new_tokens: int) -> str | None: ...
    def has_work(self) -> bool: ...
    def step(self) -> Any: ...


@dataclass
class _Req:
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
    model_type: str | None = None
    architectures: tuple[str, ...] = ()


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
        self.reqs: dict[str, _Req] = {}
        self.user_requests = 0
        self._counter = 0
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._last_emit = 0.0
        self._pool: list[str] = make_output_text(tokenizer, OUTPUT_POOL, seed)
        self._stop: asyncio.Future[str] | None = None
        self.decode_log_interval = max(1, int(info.server_args.get("decode_log_interval") or 40))
        self._decode_steps, self._gen_tokens, self._gen_time = 0, 0, 0.0
        self.last_gen_throughput = 0.0

    # ----------------------------------------------------------------- lifecycle

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._access_log], client_max_size=64 * 1024 * 1024)
        r = app.router
        for path in ("/generate",):
            r.add_post(path, self.h_generate)
            r.add_put(path, self.h_generate)
        r.add_post("/v1/completions", self.h_completions)
        r.add_post("/v1/chat/completions", self.h_chat)
        r.add_get("/v1/models", self.h_models)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.h_server_info)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.h_model_info)
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.h_health)
        r.add_get("/ping", self.h_ping)
        r.add_route("POST", "/flush_cache", self.h_flush)
        r.add_route("GET", "/flush_cache", self.h_flush)
        return app

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
                    r = self.engine.step()
                    dur = float(r.duration_s) * (0.5 if self.faults.garbage_output else 1.0)
                    if dur > self.watchdog_s:
                        await asyncio.sleep((self.watchdog_s + 5.0) * self.scale)
                        self.fatal([watchdog_line(self.watchdog_s)])
                    # Absolute deadlines: event-loop overhead does not accumulate into the timing.
                    deadline = max(deadline, loop.time() - 0.05) + dur * self.scale
                    await asyncio.sleep(max(0.0, deadline - loop.time()))
                    for line in getattr(r, "log_lines", ()):
                        self.log(line, tp=0)
                    self._deliver(r.emitted)
                    if r.fatal:
                        self.fatal(scheduler_exception_lines(str(r.fatal)))
                    self._stats(r, dur)
                    if dur <= 0 and not r.emitted:
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

    def _stats(self, r: Any, dur: float) -> None:
        """`Decode batch. ...` every decode_log_interval decode forwards (simulated throughput)."""
        if getattr(r, "kind", "") != "decode":
            return
        self._decode_steps += 1
        self._gen_tokens += len(r.emitted)
        self._gen_time += dur
        if self._decode_steps % self.decode_log_interval:
            return
        used = getattr(self.engine, "kv_used", 0)
        cap = max(1, self.info.max_total_num_tokens)
        tput = self._gen_tokens / self._gen_time if self._gen_time > 0 else 0.0
        self._gen_tokens, self._gen_time = 0, 0.0
        self.last_gen_throughput = tput
        running = getattr(self.engine, "num_running", len(r.emitted))
        graph = 0 < len(r.emitted) <= self.info.captured_bs
        self.log(
            f"Decode batch, #running-req: {running}, "
            f"#token: {used}, token usage: {used / cap:.2f}, cuda graph: {graph}, "
            f"gen throughput (token/s): {tput:.2f}, #queue-req: {getattr(self.engine, 'num_waiting', 0)}, ",
            tp=0,
        )

    def _deliver(self, emitted: Sequence[tuple[str, int, bool]]) -> None:
        if emitted:
            self._last_emit = time.monotonic()
        for rid, n, finished in emitted:
            req = self.reqs.get(rid)
            if req is not None:
                req.queue.put_nowait((int(n), bool(finished)))

    def _submit(self, prompt_tokens: int, max_new_tokens: int, rid: str | None, *, user: bool) -> _Req:
        self._counter += 1
        rid = rid or uuid.uuid4().hex
        if rid in self.reqs:
            raise _BadRequest(f"Duplicate request ID: {rid}")
        req = _Req(rid, prompt_tokens, max_new_tokens, self._pieces(max_new_tokens), time.monotonic(), user=user)
        err = self.engine.submit(rid, prompt_tokens, max_new_tokens)
        if err:
            raise _BadRequest(err)
        self.reqs[rid] = req
        self._wake.set()
        return req

    def _pieces(self, n: int) -> list[str]:
        """Output pieces (one non-empty piece per token): a seeded rotation of one shared pool,
        since generating text per request costs milliseconds that 1/time_scale amplifies."""
        pool = self._pool
        if self.faults.garbage_output:
            return [pool[0]] * n
        start = random.Random(self.seed * 1_000_003 + self._counter).randrange(len(pool))
        return [pool[(start + i) % len(pool)] for i in range(n)]

    def _release(self, req: _Req) -> None:
        self.reqs.pop(req.rid, None)
        abort = getattr(self.engine, "abort", None)
        if abort is not None:
            try:
                abort(req.rid)
            except Exception:  # noqa: BLE001 - finished requests may be unknown to the engine
                pass

    async def _tokens(self, req: _Req) -> Any:
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

    def _admit(self, prompt_tokens: int, max_new_tokens: int) -> None:
        ctx = self.info.context_len
        if prompt_tokens >= ctx:
            raise _BadRequest(
                f"The input ({prompt_tokens} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        if prompt_tokens + max_new_tokens > ctx and not self.info.server_args.get("allow_auto_truncate"):
            raise _BadRequest(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
                f"You requested a total of {prompt_tokens + max_new_tokens} tokens: {prompt_tokens} tokens "
                f"from the input messages and {max_new_tokens} tokens for the completion. Please reduce "
                "the number of tokens in the input messages or the completion to fit within the limit."
            )

    def _count_user_request(self) -> None:
        if self.status == "up":
            self.user_requests += 1
            limit = self.faults.crash_after
            if limit is not None and self.user_requests > limit:
                self.fatal(scheduler_exception_lines("RuntimeError: CUDA error: an illegal memory access was encountered"))

    def _prompt_len(self, text: Any, input_ids: Any) -> int:
        if input_ids is not None:
            if not isinstance(input_ids, list) or not all(isinstance(t, int) for t in input_ids):
                raise _BadRequest("input_ids must be a list of token ids")
            return len(input_ids)
        if isinstance(text, str):
            return self._count(self.tok, text)
        raise _BadRequest("Either text or input_ids should be provided.")

    # ----------------------------------------------------------------- handlers

    async def h_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            sp = body.get("sampling_params") or {}
            max_new = int(sp.get("max_new_tokens") if sp.get("max_new_tokens") is not None else DEFAULT_MAX_NEW_TOKENS)
            text, ids = body.get("text"), body.get("input_ids")
            if isinstance(text, list) or (isinstance(ids, list) and ids and isinstance(ids[0], list)):
                return await self._generate_batch(body, max_new)
            prompt = self._prompt_len(text, ids)
            self._admit(prompt, max_new)
            self._count_user_request()
            req = self._submit(prompt, max_new, body.get("rid"), user=True)
        except _BadRequest as exc:
            return _error(exc.message, exc.status)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(f"Invalid request: {exc}", 400)
        if body.get("stream"):
            return await self._stream_generate(request, req)
        try:
            async for text_out, n, _ in self._tokens(req):
                pass
        finally:
            self._release(req)
        return web.json_response(self._generate_obj(req, text_out, n, True))

    async def _generate_batch(self, body: dict[str, Any], max_new: int) -> web.StreamResponse:
        if body.get("stream"):
            raise _BadRequest("Batch streaming is not supported by the simulator.")
        texts = body.get("text")
        ids = body.get("input_ids")
        items = [(t, None) for t in texts] if isinstance(texts, list) else [(None, i) for i in ids]
        reqs = []
        for t, i in items:
            prompt = self._prompt_len(t, i)
            self._admit(prompt, max_new)
            self._count_user_request()
            reqs.append(self._submit(prompt, max_new, None, user=True))

        async def one(req: _Req) -> dict[str, Any]:
            try:
                async for out, n, _ in self._tokens(req):
                    pass
            finally:
                self._release(req)
            return self._generate_obj(req, out, n, True)

        return web.json_response(list(await asyncio.gather(*(one(r) for r in reqs))))

    def _generate_obj(self, req: _Req, text: str, n: int, finished: bool) -> dict[str, Any]:
        return {
            "text": text,
            "meta_info": {
                "id": req.rid,
                "finish_reason": {"type": "length", "length": n} if finished else None,
                "prompt_tokens": req.prompt_tokens,
                "weight_version": "default",
                "total_retractions": 0,
                "completion_tokens": n,
                "cached_tokens": 0,
                "e2e_latency": round(time.monotonic() - req.created, 6),
            },
        }

    async def _stream_generate(self, request: web.Request, req: _Req) -> web.StreamResponse:
        resp = _sse_response()
        try:
            await resp.prepare(request)
            async for text, n, finished in self._tokens(req):
                await resp.write(_sse(self._generate_obj(req, text, n, finished)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self._release(req)
        return resp

    async def h_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def h_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def _openai(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            if chat:
                msgs = body.get("messages") or []
                prompt_text = "\n".join(_content_text(m.get("content")) for m in msgs if isinstance(m, dict))
                prompt = self._prompt_len(prompt_text, None)
                max_new = body.get("max_completion_tokens") or body.get("max_tokens")
            else:
                p = body.get("prompt")
                if isinstance(p, list) and p and isinstance(p[0], str):
                    if len(p) != 1:
                        raise _BadRequest("The simulator supports one prompt per completion request.")
                    p = p[0]
                prompt = self._prompt_len(p if isinstance(p, str) else None, p if isinstance(p, list) else None)
                max_new = body.get("max_tokens", 16)
            max_new = int(max_new if max_new is not None else DEFAULT_MAX_NEW_TOKENS)
            self._admit(prompt, max_new)
            self._count_user_request()
            req = self._submit(prompt, max_new, body.get("rid"), user=True)
        except _BadRequest as exc:
            return _error(exc.message, exc.status, openai=True)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(f"Invalid request: {exc}", 400, openai=True)
        model = body.get("model") or self.info.served_model_name
        oid = f"{'chatcmpl' if chat else 'cmpl'}-{req.rid}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            try:
                async for text, n, _ in self._tokens(req):
                    pass
            finally:
                self._release(req)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length", "matched_stop": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
            else:
                choice["text"] = text
            return web.json_response({
                "id": oid, "object": kind, "created": created, "model": model, "choices": [choice],
                "usage": _usage(req.prompt_tokens, n),
            })
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = _sse_response()
        obj = f"{kind}.chunk" if chat else kind
        try:
            await resp.prepare(request)
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                await resp.write(_sse({"id": oid, "object": obj, "created": created, "model": model, "choices": [first]}))
            sent, n = 0, 0
            async for text, n, finished in self._tokens(req):
                delta = text[sent:]
                sent = len(text)
                reason = "length" if finished else None
                c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
                if chat:
                    c["delta"] = {"content": delta}
                else:
                    c["text"] = delta
                await resp.write(_sse({"id": oid, "object": obj, "created": created, "model": model, "choices": [c]}))
            if include_usage:
                await resp.write(_sse({"id": oid, "object": obj, "created": created, "model": model,
                                       "choices": [], "usage": _usage(req.prompt_tokens, n)}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            self._release(req)
        return resp

    async def h_models(self, request: web.Request) -> web.Response:
        name = self.info.served_model_name
        return web.json_response({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": name, "parent": None, "max_model_len": self.info.context_len,
        }]})

    async def h_server_info(self, request: web.Request) -> web.Response:
        if request.path == "/get_server_info":
            self.log("Endpoint '/get_server_info' is deprecated and will be removed in a future version. "
                     "Please use '/server_info' instead.")
        running = sum(1 for r in self.reqs.values() if r.user)
        return web.json_response({
            **self.info.server_args,
            "status": "ready",
            "max_total_num_tokens": self.info.max_total_num_tokens,
            "max_req_input_len": self.info.context_len - 1,
            "internal_states": [{
                "attention_backend": self.info.server_args.get("attention_backend"),
                "memory_usage": dict(self.info.memory_usage),
                "last_gen_throughput": round(self.last_gen_throughput, 2),
                "load": running,
            }],
            "version": VERSION,
        })

    async def h_model_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.info.server_args.get("model_path"),
            "tokenizer_path": self.info.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": self.info.model_type,
            "architectures": list(self.info.architectures) or None,
        })

    async def h_health(self, request: web.Request) -> web.Response:
        if self.status == "shutting_down":
            self.log("Health check request received during shutdown. Returning 503.")
            return web.Response(status=503)
        if self.status != "up":
            return web.Response(status=503)
        tic = time.monotonic()
        req = self._submit(1, 1, f"HEALTH_CHECK_{time.time()}", user=False)
        try:
            deadline = tic + max(HEALTH_CHECK_TIMEOUT_S * self.scale, 1.0)
            while time.monotonic() < deadline:
                await asyncio.sleep(min(1.0 * self.scale, 1.0) or 0.001)
                if self._last_emit > tic:
                    return web.Response(status=200)
        finally:
            self._release(req)
        self.log(f"Health check failed. Server couldn't get a response from detokenizer for last "
                 f"{HEALTH_CHECK_TIMEOUT_S:.0f} seconds.")
        return web.Response(status=503)

    async def h_ping(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def h_flush(self, request: web.Request) -> web.Response:
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                 "waiting requests, the operation will not be performed.)\n")

    @web.middleware
    async def _access_log(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        addr = f"{peer[0]}:{peer[1]}" if peer else "-"
        reason = resp.reason or ""
        self.log.uvicorn("INFO", f'{addr} - "{request.method} {request.path_qs} HTTP/1.1" {resp.status} {reason}')
        return resp


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _error(message: str, status: int, *, openai: bool = False) -> web.Response:
    if openai:
        return web.json_response({"object": "error", "message": message, "type": "BadRequestError",
                                  "param": None, "code": status}, status=status)
    return web.json_response({"error": {"message": message}}, status=status)


def _sse_response() -> web.StreamResponse:
    return web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""
