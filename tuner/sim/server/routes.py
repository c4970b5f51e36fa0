"""The simulated server's HTTP application: its route table, the info and health endpoints,
and uvicorn-style access log lines."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from tuner.sim.log import Log
from tuner.sim.server.generate import GenerateHandlers
from tuner.sim.server.recorder import RecorderHandlers
from tuner.sim.server.state import SimServer

HEALTH_CHECK_TIMEOUT_S = 20.0


def build_app(server: SimServer) -> web.Application:
    """The aiohttp application of one server: SGLang's endpoints, each request logged."""
    gen, info = GenerateHandlers(server), InfoHandlers(server)
    app = web.Application(middlewares=[access_log(server.log)], client_max_size=64 * 1024 * 1024)
    r = app.router
    for path in ("/generate",):
        r.add_post(path, gen.h_generate)
        r.add_put(path, gen.h_generate)
    r.add_post("/v1/completions", gen.h_completions)
    r.add_post("/v1/chat/completions", gen.h_chat)
    r.add_get("/v1/models", info.h_models)
    for path in ("/server_info", "/get_server_info"):
        r.add_get(path, info.h_server_info)
    for path in ("/model_info", "/get_model_info"):
        r.add_get(path, info.h_model_info)
    for path in ("/health", "/health_generate"):
        r.add_get(path, info.h_health)
    r.add_get("/ping", info.h_ping)
    r.add_route("POST", "/flush_cache", info.h_flush)
    r.add_route("GET", "/flush_cache", info.h_flush)
    recorder = server.recorder = RecorderHandlers(server)
    for method in ("GET", "POST"):
        r.add_route(method, "/start_expert_distribution_record", recorder.h_start)
        r.add_route(method, "/stop_expert_distribution_record", recorder.h_stop)
        r.add_route(method, "/dump_expert_distribution_record", recorder.h_dump)
    return app


def access_log(log: Log) -> Any:
    """Middleware writing uvicorn's access line for every request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        addr = f"{peer[0]}:{peer[1]}" if peer else "-"
        reason = resp.reason or ""
        log.uvicorn("INFO", f'{addr} - "{request.method} {request.path_qs} HTTP/1.1" {resp.status} {reason}')
        return resp

    return middleware


class InfoHandlers:
    """Endpoints that report on the server or check its health."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def h_models(self, request: web.Request) -> web.Response:
        name = self.server.info.served_model_name
        return web.json_response({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": name, "parent": None, "max_model_len": self.server.info.context_len,
        }]})

    async def h_server_info(self, request: web.Request) -> web.Response:
        if request.path == "/get_server_info":
            self.server.log("Endpoint '/get_server_info' is deprecated and will be removed in a future version. "
                            "Please use '/server_info' instead.")
        running = sum(1 for r in self.server.reqs.values() if r.user)
        return web.json_response({
            **self.server.info.server_args,
            "status": "ready",
            "max_total_num_tokens": self.server.info.max_total_num_tokens,
            "max_req_input_len": self.server.info.context_len - 1,
            "internal_states": [{
                "attention_backend": self.server.info.server_args.get("attention_backend"),
                "memory_usage": dict(self.server.info.memory_usage),
                "last_gen_throughput": round(self.server.last_gen_throughput, 2),
                "load": running,
            }],
            "version": self.server.info.version,
        })

    async def h_model_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.server.info.server_args.get("model_path"),
            "tokenizer_path": self.server.info.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": self.server.info.model_type,
            "architectures": list(self.server.info.architectures) or None,
        })

    async def h_health(self, request: web.Request) -> web.Response:
        if self.server.status == "shutting_down":
            self.server.log("Health check request received during shutdown. Returning 503.")
            return web.Response(status=503)
        if self.server.status != "up":
            return web.Response(status=503)
        tic = time.monotonic()
        req = self.server.submit(1, 1, f"HEALTH_CHECK_{time.time()}", user=False)
        try:
            deadline = tic + max(HEALTH_CHECK_TIMEOUT_S * self.server.scale, 1.0)
            while time.monotonic() < deadline:
                await asyncio.sleep(min(1.0 * self.server.scale, 1.0) or 0.001)
                if self.server.last_emit > tic:
                    return web.Response(status=200)
        finally:
            self.server.release(req)
        self.server.log(f"Health check failed. Server couldn't get a response from detokenizer for last "
                        f"{HEALTH_CHECK_TIMEOUT_S:.0f} seconds.")
        return web.Response(status=503)

    async def h_ping(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def h_flush(self, request: web.Request) -> web.Response:
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                 "waiting requests, the operation will not be performed.)\n")
