"""The expert-distribution recorder endpoints of the simulated server (start, stop, dump).

Like sglang, it records only with ``--expert-distribution-recorder-mode`` set, and the dump is
written into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (default /tmp) and logged."""
from __future__ import annotations

import os
import random
from pathlib import Path

from aiohttp import web

from tuner.sim.recording import record_dump
from tuner.sim.server.state import SimServer


class RecorderHandlers:
    """Counts the tokens submitted while recording; the dump draws counts for them."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.recording = False
        self.tokens = 0
        self.dumps = 0

    def on_submit(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if self.recording:
            self.tokens += prompt_tokens + max_new_tokens

    @property
    def enabled(self) -> bool:
        return bool(self.server.info.server_args.get("expert_distribution_recorder_mode"))

    async def h_start(self, request: web.Request) -> web.Response:
        self.recording, self.tokens = self.enabled, 0
        return web.Response(text="Start recording the expert distribution.\n")

    async def h_stop(self, request: web.Request) -> web.Response:
        self.recording = False
        return web.Response(text="Stop recording the expert distribution.\n")

    async def h_dump(self, request: web.Request) -> web.Response:
        scenario = getattr(self.server.engine, "scenario", None)
        if self.enabled and scenario is not None:
            self.dumps += 1
            directory = Path(os.environ.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR") or "/tmp")
            seed = random.Random(f"dump/{self.server.seed}/{self.dumps}").randrange(2**31)
            path = record_dump(scenario, self.tokens, directory, seed=seed)
            self.server.log(f"Write expert distribution to {path}")
        return web.Response(text="Dump expert distribution record.\n")
