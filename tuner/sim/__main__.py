"""`python -m tuner.sim [launch_server flags]`: a simulated `python -m sglang.launch_server`.

Start-up replays the real launcher's order (sglang python/sglang/srt/entrypoints/http_server.py,
`launch_server`): server_args line, scheduler child
`sglang::scheduler_TP0`, weight loading (simulated time), KV / graph / summary lines, then
uvicorn start, bind, warmup, `The server is fired up and ready to roll!`. Failures print the
real text and end the way the real launcher does:

| what | exit |
|---|---|
| usage error (unrecognized `--kt-amx-*`, bad value, no scenario) | 2 |
| bad `--config` file, unknown scenario, impossible flags (TP > GPUs, ...) | 1 |
| scheduler exception at start (CUDA OOM, Not enough memory, graph capture, bad KT args) | -9 (SIGKILL of itself) |
| native scheduler crash at start (`Rank 0 scheduler is dead`) | 1 |
| HTTP bind failure | -9 after the warmup poll gives up (120 s x time scale); 1 if another server answers |
| warmup failure, runtime failure (OOM mid-run, crash_after) | -9 |
| SIGTERM before warmup / after warmup | -15 / graceful drain, then -9 |
| SIGINT while serving | 0 |
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.sim.args import PROG, ConfigFileError, SimArgs, UsageError, format_server_args, parse_args
from tuner.sim.dialect import VERSIONS, memory_usage, startup_lines
from tuner.sim.faults import ProcessTree, native_crash_lines, scheduler_exception_lines
from tuner.sim.log import Log
from tuner.sim.server.routes import build_app
from tuner.sim.server.state import ServerInfo, SimServer

if TYPE_CHECKING:   # imported where used: the model is not needed for a usage error
    from tuner.sim.perfmodel.config import SimConfig
    from tuner.sim.perfmodel.startup import StartupResult
    from tuner.sim.scenario import Scenario

_WARMUP_POLLS = 120
_CHILD_CODE = """
import os, signal, sys, time
ppid, name = int(sys.argv[1]), sys.argv[2]
try:
    import setproctitle
    setproctitle.setproctitle(name)
except Exception:
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except Exception:
        pass
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == ppid:
    time.sleep(0.5)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["optimum"]:  # `python -m tuner.sim optimum --scenario NAME --space FILE`
        from tuner.sim.optimum.cli import main as optimum_main

        return optimum_main(argv[1:])
    if argv[:1] == ["placement-gains"]:  # `python -m tuner.sim placement-gains [--scenario NAME]`
        from tuner.sim.gains import main as gains_main

        return gains_main(argv[1:])
    if argv[:1] == ["dump-args"]:  # `python -m tuner.sim dump-args [--sim-dialect NAME]`: its parser, as kttune reads a server's
        return _dump_args(argv[1:])
    if argv[:1] == ["check-config"]:  # `python -m tuner.sim check-config FILE [--sim-dialect NAME]`
        return _check_config(argv[1], argv[2:]) if len(argv) > 1 else 2
    try:
        args = parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"{exc.usage}{PROG}: error: {exc}\n")
        return 2
    except ConfigFileError as exc:
        sys.stderr.write(f"Traceback (most recent call last):\n  File \"{PROG}\", line 1, in <module>\n"
                         f"ValueError: {exc}\n")
        return 1
    return asyncio.run(_Launcher(args).run())


class _Launcher:
    def __init__(self, args: SimArgs) -> None:
        self.args = args
        self.log = Log()
        self.tree = ProcessTree()
        self.scale = args.sim.time_scale
        self.faults = args.sim.faults
        self.seed = args.sim.seed if args.sim.seed is not None else random.SystemRandom().randrange(2**31)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) * self.scale)

    async def run(self) -> int:
        from tuner.errors import ConfigError
        from tuner.sim.args import to_sim_config
        from tuner.sim.perfmodel.config import resolve
        from tuner.sim.perfmodel.startup import startup_check
        from tuner.sim.scenario import load_scenario

        args, log = self.args, self.log
        try:
            scn = load_scenario(args.sim.scenario)
        except ConfigError as exc:
            log(f"ERROR: simulator scenario: {exc}")
            return 1
        cfg = to_sim_config(args)
        server = dict(args.server)
        if args.unknown:
            log(f"WARNING: unrecognized arguments ignored by this server version: {' '.join(args.unknown)}")
        if args.kt_enabled and not server["disable_shared_experts_fusion"]:
            server["disable_shared_experts_fusion"] = True
            log("KTransformers EP is enabled. --disable-shared-experts-fusion is automatically set "
                "to prevent shared experts from being offloaded to CPU.")
        if server["attention_backend"] is None:
            server["attention_backend"] = "flashinfer" if scn.model.attention == "mla" else "fa3"
            log(f"Attention backend not specified. Use {server['attention_backend']} backend by default.")
        try:
            rc = resolve(scn, cfg)
            server.update(chunked_prefill_size=rc.chunk if rc.chunk > 0 else server["chunked_prefill_size"],
                          mem_fraction_static=rc.mfs, cuda_graph_max_bs=rc.graph_max_bs or server["cuda_graph_max_bs"])
        except Exception:  # noqa: BLE001 - invalid combos are reported by startup_check below
            pass
        server.update(tokenizer_path=args.tokenizer_path, served_model_name=args.served_model_name,
                      random_seed=server["random_seed"] if server["random_seed"] is not None else self.seed % 10**9)
        log(format_server_args(server))

        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            return 1
        self._spawn_children()
        noisy = args.sim.noise > 0
        startup = startup_check(scn, cfg, fuzz_seed=self.seed if noisy else None)
        return await self._load_and_serve(scn, cfg, server, startup, tokenizer)

    # ----------------------------------------------------------------- pieces

    def _load_tokenizer(self) -> Any:
        from tuner.sim import offline

        path = Path(self.args.tokenizer_path)
        local = path if (path / "tokenizer.json").is_file() or path.name == "tokenizer.json" else None
        try:
            return offline.load_tokenizer(local)
        except Exception as exc:  # noqa: BLE001 - shown like the real tokenizer load failure
            self.log(f"ERROR: could not load the tokenizer: {type(exc).__name__}: {exc}")
            return None

    def _spawn_children(self) -> None:
        for name in ("sglang::scheduler_TP0", "sglang::detokenizer"):
            self.tree.children.append(subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, str(os.getpid()), name],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
            ))

    async def _load_and_serve(self, scn: Scenario, cfg: SimConfig, server: dict[str, Any], st: StartupResult,
                              tokenizer: Any) -> int:
        log, model = self.log, scn.model
        if st.stage == "args":
            for line in st.error_lines:
                log(line)
            self.tree.kill_children()
            return 1
        mem = st.mem_per_gpu_gb
        free_gib = mem.get("capacity", scn.gpu.visible_memory_gib) - mem.get("context", 0.5)
        load_s = st.load_time_s or _load_time(scn, mem, cfg)
        await self.sleep(2.0)
        log("Init torch distributed begin.", tp=0)
        await self.sleep(1.0)
        sim = self.args.sim
        captured = min(st.config.graph_max_bs, st.max_running_requests) if st.config else 0
        for line in startup_lines(["Init torch distributed ends. elapsed=1.00 s, mem usage=0.09 GB",
                                   f"Load weight begin. avail mem={free_gib:.2f} GB"], sim.dialect, memory_log=sim.memory_log):
            log(line, tp=0)
        raw = list(st.log_lines)  # KT placement lines come from model init, before the weights
        cut = next((i for i, line in enumerate(raw) if line.startswith("Load weight end")), len(raw))
        for line in startup_lines(raw[:cut], sim.dialect, memory_log=sim.memory_log):
            log(line, tp=0)
        lines = startup_lines(raw[cut:], sim.dialect, memory_log=sim.memory_log, captured_bs=max(captured, 1))
        if self.faults.hang_at_start:
            await asyncio.Event().wait()
        if self.faults.crash_at_start:
            await self.sleep(0.3 * load_s)
            return self._native_crash()
        await self._load_weights(self.faults.slow_start_s + load_s * _load_share(st, free_gib))
        if not sim.memory_log and st.ok and st.config and st.config.graph_max_bs:
            await self.sleep(5 + 0.3 * captured)  # the capture takes its time, logged or not
        for line in lines:
            if found := re.search(r"Capture .*graph end\. (?:Time elapsed: |.*elapsed=)([0-9.]+) s", line):
                await self.sleep(float(found.group(1)))
            log(line, tp=0)
            if self.faults.stalls_after(line):
                await asyncio.Event().wait()
        if not st.ok:
            if any(e.startswith("Rank 0 scheduler is dead") for e in st.error_lines):
                return self._native_crash(st.error_lines)
            if st.stage != "warmup":
                return self._scheduler_exception(st.error_lines)
        if self.tree.dead_child() is not None:
            return self._native_crash()
        if st.ok and self.tree.children:
            from tuner.sim.gpus import hold_gpu_memory

            held = sum(mem.get(k, 0.0) for k in ("weights", "kv", "graphs"))
            hold_gpu_memory(self.tree.children[0].pid, held, int(self.args.server.get("tp_size") or 1))
        from tuner.sim.engine import Engine

        engine = Engine(scn, cfg, noise_sigma=self.args.sim.noise, seed=self.seed) if st.ok else None
        info = ServerInfo(
            server_args=server,
            served_model_name=self.args.served_model_name,
            tokenizer_path=self.args.tokenizer_path,
            context_len=(st.config.context_len if st.config else model.context_len),
            max_total_num_tokens=st.kv_tokens,
            memory_usage=memory_usage(sim.dialect, weight=mem.get("weights", 0.0), kvcache=mem.get("kv", 0.0),
                                      token_capacity=st.kv_tokens, graph=mem.get("graphs", 0.0),
                                      startup_available=st.runtime_free_gb),
            captured_bs=captured, version=VERSIONS[sim.dialect],
            **_hf_config(self.args.server["model_path"], model.name),
        )
        return await self._serve(engine, info, tokenizer, st)

    async def _serve(self, engine: Any, info: ServerInfo, tokenizer: Any, st: StartupResult) -> int:
        from aiohttp import web

        from tuner.sim import offline

        log, host, port = self.log, self.args.server["host"], self.args.server["port"]
        srv = SimServer(
            engine=engine, info=info, tokenizer=tokenizer, count_tokens=offline.count_tokens,
            make_output_text=offline.make_output_text, log=log, tree=self.tree, time_scale=self.scale,
            faults=self.faults, seed=self.seed, watchdog_timeout_s=float(self.args.server["watchdog_timeout"]),
        )
        runner = web.AppRunner(build_app(srv), access_log=None, handle_signals=False)
        await runner.setup()
        log.uvicorn("INFO", f"Started server process [{os.getpid()}]")
        log.uvicorn("INFO", "Waiting for application startup.")
        log.uvicorn("INFO", "Application startup complete.")
        try:
            if self.faults.port_in_use:
                raise OSError(98, f"error while attempting to bind on address {(host, port)!r}: address already in use")
            await web.TCPSite(runner, host, port, backlog=2048).start()
        except OSError as exc:
            log.uvicorn("ERROR", str(exc))
            log.uvicorn("INFO", "Waiting for application shutdown.")
            return await self._bind_failed(host, port)
        log.uvicorn("INFO", f"Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")
        loop = asyncio.get_running_loop()
        srv.start_driver()
        loop.add_signal_handler(signal.SIGINT, srv.request_stop, "sigint")
        if not st.ok:  # stage "warmup": the first forward fails
            await self.sleep(1.0)
            log("Initialization failed. warmup error: " + "\n".join(st.error_lines))
            self.tree.die(signal.SIGKILL)
        if self.faults.unhealthy:  # the warm-up request never comes back: /health stays 503
            await asyncio.Event().wait()
        if self.faults.slow_warmup_s:
            await self._slow_warmup(self.faults.slow_warmup_s)
        if not self.args.server["skip_server_warmup"]:
            ok, err = await self._warmup(f"http://{_connect_host(host)}:{port}", srv)
            if not ok:
                log(f"Initialization failed. warmup error: {err}")
                self.tree.die(signal.SIGKILL)
        else:  # graceful SIGTERM starts with the first request; without warmup, say now
            loop.add_signal_handler(signal.SIGTERM, srv.on_sigterm)
        if srv.status == "starting":
            srv.status = "up"
        log("The server is fired up and ready to roll!")
        reason = await srv.wait_stopped()
        log.uvicorn("INFO", "Shutting down")
        await runner.cleanup()
        log.uvicorn("INFO", "Waiting for application shutdown.")
        log.uvicorn("INFO", "Application shutdown complete.")
        log.uvicorn("INFO", f"Finished server process [{os.getpid()}]")
        self.tree.kill_children()
        return 0 if reason == "sigint" else 1

    async def _warmup(self, url: str, srv: SimServer | None) -> tuple[bool, str]:
        """The launcher's warmup thread: poll /model_info (1 s apart), then one 8-token /generate."""
        import aiohttp

        last = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as s:
            for _ in range(_WARMUP_POLLS):
                await self.sleep(1.0)
                try:
                    poll_timeout = aiohttp.ClientTimeout(total=max(5.0 * self.scale, 0.2))
                    async with s.get(url + "/model_info", timeout=poll_timeout) as r:
                        if r.status == 200:
                            break
                        last = f"AssertionError: res=<Response [{r.status}]>"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    last = f"requests.exceptions.ConnectionError: {exc}"
            else:
                return False, f"Traceback (most recent call last):\n{last}"
            if srv is not None:
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGTERM, srv.on_sigterm)
            body = {"text": "The capital city of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
            try:
                async with s.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=600)) as r:
                    text = await r.text()
                    if r.status != 200:
                        return False, f"Traceback (most recent call last):\nAssertionError: {text}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return False, f"Traceback (most recent call last):\n{type(exc).__name__}: {exc}"
        return True, ""

    async def _load_weights(self, seconds: float, shards: int = 10) -> None:
        """The weight load, with the checkpoint-shard progress lines the real loader prints."""
        for k in range(1, shards + 1):
            await self.sleep(seconds / shards)
            self.log.raw(f"Loading safetensors checkpoint shards: {100 * k // shards:3d}% Completed | {k}/{shards}")

    async def _slow_warmup(self, seconds: float) -> None:
        """A warm-up forward that takes long but shows it is moving: its batches are logged."""
        self.log("Prefill batch. #new-seq: 1, #new-token: 7, #cached-token: 0, token usage: 0.00, "
                 "#running-req: 0, #queue-req: 0, ", tp=0)
        left = seconds
        while left > 0:
            await self.sleep(min(10.0, left))
            left -= 10.0
            self.log("Decode batch, #running-req: 1, #token: 8, token usage: 0.00, cuda graph: True, "
                     "gen throughput (token/s): 0.10, #queue-req: 0, ", tp=0)

    async def _bind_failed(self, host: str, port: int) -> int:
        """uvicorn exits 1, but first joins the warmup thread, which polls whoever owns the port."""
        ok, err = await self._warmup(f"http://{_connect_host(host)}:{port}", None)
        if not ok:
            self.log(f"Initialization failed. warmup error: {err}")
            self.tree.die(signal.SIGKILL)
        self.log("The server is fired up and ready to roll!")
        self.log.uvicorn("INFO", "Application shutdown complete.")
        self.tree.kill_children()
        return 1

    def _native_crash(self, lines: Sequence[str] = ()) -> int:
        """TP0 dies without an exception (segfault): the launcher sees EOF on its pipe (exit 1)."""
        child = self.tree.children[0] if self.tree.children else None
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGSEGV)
            child.wait()
        code = child.returncode if child is not None and child.returncode is not None else -11
        self.log.raw("Fatal Python error: Segmentation fault")
        out = native_crash_lines(next((ln for ln in lines if ln.startswith("Exit code:")), f"Exit code: {code}"))
        self.log(out[0])
        self.log(out[1])
        self.log.raw("\n".join(out[2:]))
        self.tree.kill_children()
        return 1

    def _scheduler_exception(self, error_lines: Sequence[str]) -> int:
        """`Scheduler hit an exception: <traceback>` in TP0, SIGQUIT to the launcher, tree killed."""
        body = [e for e in error_lines if not e.startswith(("Scheduler hit an exception", "Received sigquit"))]
        self.log("\n".join(scheduler_exception_lines(body, at_init=True)), tp=0)
        self.log("Received sigquit from a child process. It usually means the child failed.")
        self.tree.die(signal.SIGKILL)
        return 137  # not reached


def _dump_args(argv: Sequence[str]) -> int:
    """The parser of the dialect asked for, as tuner/preflight/parser_probe.py dumps a real
    server's, with the package and version that dialect's metadata names."""
    from tuner.preflight import PARSER_TAG, dump_parser
    from tuner.sim.args import DIALECT_PACKAGES, build_parser, dialect_of

    dialect = dialect_of(argv)
    package, version = DIALECT_PACKAGES[dialect]
    out = {**dump_parser(build_parser(dialect)), "dialect": dialect, "package": package, "version": version}
    print(PARSER_TAG + json.dumps(out), flush=True)
    return 0


def _check_config(path: str, argv: Sequence[str]) -> int:
    """`--config FILE` merged and parsed strictly (as the real server refuses any unknown flag),
    answered as tuner/preflight/parser_probe.py's check-config."""
    from tuner.preflight import PARSER_TAG
    from tuner.sim.args import build_parser, dialect_of, merge_config

    parser = build_parser(dialect_of(argv))
    try:
        merged = merge_config(parser, ["--config", path])
        parser.parse_args(merged)
        out: dict[str, Any] = {"ok": True, "argv": merged}
    except (UsageError, ConfigFileError) as exc:
        out = {"ok": False, "error": str(exc)}
    print(PARSER_TAG + json.dumps(out), flush=True)
    return 0


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _load_share(st: StartupResult, free_gib: float) -> float:
    """Share of the weight-loading time spent before the start-up outcome is known."""
    if st.ok or st.stage not in ("cpu", "weights"):
        return 1.0
    if st.stage == "cpu":
        return 0.05  # KT argument errors surface at model init, before the experts load
    weights = st.mem_per_gpu_gb.get("weights", 0.0)
    return min(1.0, free_gib / weights) if weights > 0 else 1.0


def _hf_config(model_path: str, model_name: str) -> dict[str, Any]:
    """model_type / architectures for /model_info: the model dir's config.json, else the bundled one."""
    bundled = Path(__file__).resolve().parent / "models" / model_name.lower() / "config.json"
    for path in (Path(model_path) / "config.json", bundled):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        return {"model_type": data.get("model_type"), "architectures": tuple(data.get("architectures") or ())}
    return {"model_type": None, "architectures": ()}


def _load_time(scn: Scenario, mem: dict[str, float], cfg: SimConfig) -> float:
    """Load time when the start-up check failed before computing one (same constants)."""
    model = scn.model
    host_gb = 0.0
    if cfg.kt_weight_path is not None:
        host_gb = model.experts * model.layers_moe * model.cpu_bytes_per_expert.get(cfg.kt_method.upper(), 0.0) / 1e9
    return scn.c("load_base_s") + host_gb / scn.c("load_gbs") + 2 * mem.get("weights", 0.0)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.exit(code)
