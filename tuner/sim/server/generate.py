"""`/generate`, `/v1/completions` and `/v1/chat/completions`: whole responses and SSE
streams of the cumulative text the driver delivers."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from tuner.sim.server.state import BadRequest, PendingRequest, SimServer

DEFAULT_MAX_NEW_TOKENS = 128


class GenerateHandlers:
    """The generation endpoints of one server."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def h_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            sampling: dict[str, Any] = body.get("sampling_params") or {}
            requested = sampling.get("max_new_tokens")
            max_new = int(requested if requested is not None else DEFAULT_MAX_NEW_TOKENS)
            text, ids = body.get("text"), body.get("input_ids")
            if isinstance(text, list) or (isinstance(ids, list) and ids and isinstance(ids[0], list)):
                return await self._generate_batch(body, max_new)
            prompt = self.server.prompt_len(text, ids)
            self.server.admit(prompt, max_new)
            self.server.count_user_request()
            req = self.server.submit(prompt, max_new, body.get("rid"), user=True)
        except BadRequest as exc:
            return _error(exc.message, exc.status)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(f"Invalid request: {exc}", 400)
        if body.get("stream"):
            return await self._stream_generate(request, req)
        try:
            async for text_out, completion_tokens, _ in self.server.tokens(req):
                pass
        finally:
            self.server.release(req)
        return web.json_response(self._generate_obj(req, text_out, completion_tokens, True))

    async def _generate_batch(self, body: dict[str, Any], max_new: int) -> web.StreamResponse:
        if body.get("stream"):
            raise BadRequest("Batch streaming is not supported by the simulator.")
        texts = body.get("text")
        ids: Any = body.get("input_ids")
        items = [(t, None) for t in texts] if isinstance(texts, list) else [(None, i) for i in ids]
        reqs = []
        for t, i in items:
            prompt = self.server.prompt_len(t, i)
            self.server.admit(prompt, max_new)
            self.server.count_user_request()
            reqs.append(self.server.submit(prompt, max_new, None, user=True))

        async def one(req: PendingRequest) -> dict[str, Any]:
            try:
                async for out, completion_tokens, _ in self.server.tokens(req):
                    pass
            finally:
                self.server.release(req)
            return self._generate_obj(req, out, completion_tokens, True)

        return web.json_response(list(await asyncio.gather(*(one(r) for r in reqs))))

    def _generate_obj(self, req: PendingRequest, text: str, completion_tokens: int, finished: bool) -> dict[str, Any]:
        return {
            "text": text,
            "meta_info": {
                "id": req.rid,
                "finish_reason": {"type": "length", "length": completion_tokens} if finished else None,
                "prompt_tokens": req.prompt_tokens,
                "weight_version": "default",
                "total_retractions": 0,
                "completion_tokens": completion_tokens,
                "cached_tokens": 0,
                "e2e_latency": round(time.monotonic() - req.created, 6),
            },
        }

    async def _stream_generate(self, request: web.Request, req: PendingRequest) -> web.StreamResponse:
        resp = _sse_response()
        try:
            await resp.prepare(request)
            async for text, completion_tokens, finished in self.server.tokens(req):
                await resp.write(_sse(self._generate_obj(req, text, completion_tokens, finished)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self.server.release(req)
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
                prompt = self.server.prompt_len(prompt_text, None)
                max_new = body.get("max_completion_tokens") or body.get("max_tokens")
            else:
                prompt_field = body.get("prompt")
                if isinstance(prompt_field, list) and prompt_field and isinstance(prompt_field[0], str):
                    if len(prompt_field) != 1:
                        raise BadRequest("The simulator supports one prompt per completion request.")
                    prompt_field = prompt_field[0]
                prompt = self.server.prompt_len(prompt_field if isinstance(prompt_field, str) else None,
                                                prompt_field if isinstance(prompt_field, list) else None)
                max_new = body.get("max_tokens", 16)
            max_new = int(max_new if max_new is not None else DEFAULT_MAX_NEW_TOKENS)
            self.server.admit(prompt, max_new)
            self.server.count_user_request()
            req = self.server.submit(prompt, max_new, body.get("rid"), user=True)
        except BadRequest as exc:
            return _error(exc.message, exc.status, openai=True)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(f"Invalid request: {exc}", 400, openai=True)
        model = body.get("model") or self.server.info.served_model_name
        oid = f"{'chatcmpl' if chat else 'cmpl'}-{req.rid}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            try:
                async for text, completion_tokens, _ in self.server.tokens(req):
                    pass
            finally:
                self.server.release(req)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length", "matched_stop": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
            else:
                choice["text"] = text
            return web.json_response({
                "id": oid, "object": kind, "created": created, "model": model, "choices": [choice],
                "usage": _usage(req.prompt_tokens, completion_tokens),
            })
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = _sse_response()
        obj = f"{kind}.chunk" if chat else kind
        try:
            await resp.prepare(request)
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                await resp.write(_sse({"id": oid, "object": obj, "created": created, "model": model, "choices": [first]}))
            sent, completion_tokens = 0, 0
            async for text, completion_tokens, finished in self.server.tokens(req):
                delta = text[sent:]
                sent = len(text)
                reason = "length" if finished else None
                chunk_choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
                if chat:
                    chunk_choice["delta"] = {"content": delta}
                else:
                    chunk_choice["text"] = delta
                await resp.write(_sse({"id": oid, "object": obj, "created": created, "model": model,
                                       "choices": [chunk_choice]}))
            if include_usage:
                await resp.write(_sse({"id": oid, "object": obj, "created": created, "model": model,
                                       "choices": [], "usage": _usage(req.prompt_tokens, completion_tokens)}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            self.server.release(req)
        return resp


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
