"""One launched trial: start the server → wait until really ready → check its output is
sane (tuner.trial.quality) → run each workload → tear the whole tree down. Returns a TrialRun;
never raises for a server/bench fault. Only KeyboardInterrupt (Ctrl-C, or SIGTERM mapped to
it by the CLI) escapes, and only after the server tree is gone."""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner import outcome
from tuner.bench import MIN_RETOKENIZED_SHARE, retokenized_share, run_workload
from tuner.config import QualitySpec, SearchSpace, split_env
from tuner.errors import BenchmarkError, KttuneError, ServerLaunchError, TeardownError
from tuner.outcome import Reason, TrialOutcome
from tuner.server import (
    RECORDER_DIR_ENV,
    RECORDER_FLAGS,
    LogTail,
    ServerHandle,
    build_server_argv,
    decisive_line,
    failure_message,
    fetch_server_info,
    find_dump,
    find_free_port,
    is_alive,
    memory_from_server_info,
    parse_memory_lines,
    recorder_dir,
    runtime_oom,
    silent_fallback,
    start_recording,
    start_server,
    stop_and_dump,
    stop_server,
    wait_ready,
)
from tuner.trial.probe import PROBE_SUFFIX, probe_workload
from tuner.trial.quality import check_quality

PhaseCallback = Callable[[str], None]


# Early stop: called with the probe's metrics (keyed like the full workload's); True = prune.
ProbeHook = Callable[[dict[str, float]], bool]




@dataclass
class TrialRun:
    """What a launched trial leaves behind besides its outcome (stored as user attrs)."""

    outcome: TrialOutcome
    argv: list[str]
    trial_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    # tuner.trial.quality.QualityResult.to_attr(); "reference" holds what later trials are
    # compared with when this trial's check passed (the loop keeps the first one).
    quality: dict[str, Any] = field(default_factory=dict)
    # False when no server process was ever started (the port was taken, the interpreter
    # cannot run): such a launch spends nothing of the budget.
    started: bool = True
    # The expert-distribution dump of a recording launch (None: none asked for, or none written),
    # and why a recording asked for left none.
    expert_distribution: str | None = None
    recording_error: str | None = None
    # Memory figures the server-info endpoint reported after readiness (named as the log
    # parser names them): the primary source, the log fills in what it lacks.
    read_back: dict[str, Any] = field(default_factory=dict)

    def log_text(self) -> str:
        return _read(self.trial_dir / "server.log")


def trial_port(space: SearchSpace) -> int:
    """A fresh free port per trial (same-port restarts are known to hang), unless fixed."""
    host = space.server.host
    if space.server.port is not None:
        return space.server.port
    return find_free_port(host)


def server_argv(space: SearchSpace, flags: Mapping[str, Any], port: int) -> list[str]:
    return build_server_argv(space.server.launcher(), split_env(flags)[0], host=space.server.host, port=port)


def server_env(space: SearchSpace, flags: Mapping[str, Any]) -> dict[str, str]:
    """The server's environment variables: the space's fixed ones and the tuned ones."""
    return {**space.server.env, **split_env(flags)[1]}


def recording_flags(flags: Mapping[str, Any], trial_dir: Path) -> dict[str, Any]:
    """`flags` of a launch that records the expert distribution into the trial folder."""
    return {**flags, **RECORDER_FLAGS, f"env:{RECORDER_DIR_ENV}": str(recorder_dir(trial_dir))}


def bench_tokenizer(space: SearchSpace, flags: Mapping[str, Any]) -> str | None:
    if space.bench.tokenizer:
        return space.bench.tokenizer
    tok = flags.get("tokenizer-path") or flags.get("model-path") or flags.get("model")
    return str(tok) if tok else None


def run_trial(space: SearchSpace, flags: Mapping[str, Any], trial_dir: Path, *,
              on_phase: PhaseCallback | None = None, teardown_gpu_timeout_s: float = 120.0,
              quality_reference: Mapping[str, Any] | None = None,
              on_probe: ProbeHook | None = None, record_experts: bool = False) -> TrialRun:
    """Launch, check, benchmark and tear down one configuration.

    ``quality_reference`` is the ``quality["reference"]`` of the study's reference trial
    (None for the first one: its own check then only looks for empty or degenerate text).
    ``on_probe``: run the probe workload first and stop after it when the hook says so.
    ``record_experts``: record the expert distribution over the workloads and dump it under
    the trial folder (`TrialRun.expert_distribution`); a recorder fault leaves the measurement.
    """
    phase = on_phase or (lambda _p: None)
    quality = QualitySpec.from_space(space)
    trial_dir.mkdir(parents=True, exist_ok=True)
    host = space.server.host
    port = trial_port(space)
    if record_experts:
        flags = recording_flags(flags, trial_dir)
    argv = server_argv(space, flags, port)  # the server gets the secrets; what is written does not
    _write_json(trial_dir / "server.argv.json", space.redact(argv))
    run = TrialRun(outcome=outcome.failure(space, "not_started", ""), argv=space.redact(argv), trial_dir=trial_dir)
    phase("launching")
    try:
        handle = start_server(argv, log_path=trial_dir / "server.log", host=host, port=port,
                              env=server_env(space, flags), recorded_argv=space.redact(argv))
    except ServerLaunchError as exc:  # port taken before launch, interpreter cannot start
        run.outcome = outcome.failure(space, exc.reason, str(exc))
        run.started = False
        return run
    metrics: dict[str, float] = {}
    try:
        try:
            run.timings["ready_s"] = wait_ready(handle, timeout_s=space.server.start_timeout_s,
                                                stall_timeout_s=space.server.stall_timeout_s)
            run.read_back = read_back_memory(handle.base_url, _auth_headers(flags))
            fallback = silent_fallback(_read(handle.log_path))
            if fallback is not None:
                run.outcome = outcome.failure(space, fallback.reason, f"the server ignored its configuration: "
                                              f"{fallback.line}")
                return run  # the finally below still tears the server down
            if quality.enabled:
                phase("checking output quality")
                result = check_quality(handle.base_url, quality, reference=quality_reference,
                                       server_alive=lambda: is_alive(handle), headers=_auth_headers(flags))
                run.quality = {**result.to_attr(), "reference": result.as_reference()}
                run.timings["quality_s"] = result.wall_s
                _write_json(trial_dir / "quality.json", run.quality)
                if not result.ok:
                    run.outcome = outcome.failure(space, str(result.reason), result.message)
                    return run  # the finally below still tears the server down
            probe = probe_workload(space) if on_probe is not None else None
            if probe is not None and on_probe is not None:
                phase(f"probing {probe.name}")
                res = run_workload(space.bench, probe, host=host, port=port, trial_dir=trial_dir,
                                   tokenizer=bench_tokenizer(space, flags), slos=space.slos,
                                   server_alive=lambda: is_alive(handle), env=_bench_auth_env(flags))
                metrics.update({f"{probe.name}.{k}": v for k, v in res.metrics.items()})
                run.timings[f"bench_{probe.name}_s"] = res.wall_s
                base = probe.name[:-len(PROBE_SUFFIX)]
                if on_probe({f"{base}.{k}": v for k, v in res.metrics.items()}):
                    run.outcome = outcome.pruned(metrics)
                    return run  # the finally below still tears the server down
            recording = record_experts and _recorder(run, start_recording, handle.base_url, flags)
            for w in space.workloads:
                phase(f"benchmarking {w.name}")
                res = run_workload(space.bench, w, host=host, port=port, trial_dir=trial_dir,
                                   tokenizer=bench_tokenizer(space, flags), slos=space.slos,
                                   server_alive=lambda: is_alive(handle), env=_bench_auth_env(flags))
                metrics.update({f"{w.name}.{k}": v for k, v in res.metrics.items()})
                run.timings[f"bench_{w.name}_s"] = res.wall_s
                share = retokenized_share(res.metrics)
                if share is not None and share < MIN_RETOKENIZED_SHARE:
                    # Checked whether or not the quality guard ran: garbage must never be measured.
                    run.outcome = outcome.failure(
                        space, Reason.QUALITY, f"workload {w.name}: the client re-tokenized {share:.1%} of the "
                        f"{res.metrics['total_output_tokens']:.0f} tokens the server generated (text lost or garbled)",
                        metrics)
                    return run  # the finally below still tears the server down
            if recording and _recorder(run, stop_and_dump, handle.base_url, flags):
                dump = find_dump(recorder_dir(trial_dir))
                run.expert_distribution = str(dump) if dump is not None else None
                if dump is None:
                    run.recording_error = f"the server wrote no dump into {recorder_dir(trial_dir)}"
            run.outcome = outcome.success(space, metrics, {})
        except ServerLaunchError as exc:
            run.outcome = outcome.failure(space, exc.reason, str(exc), metrics)
        except BenchmarkError as exc:
            # A server that died under load is the config's fault (e.g. runtime OOM).
            reason, message = exc.reason, str(exc)
            if reason in ("bench_no_result", "bench_incomplete") and not is_alive(handle):
                reason = "server_died"
            if reason == "server_died":  # the server's own words, not the client's connection errors
                reason, message = _server_death(handle, message)
            run.outcome = outcome.failure(space, reason, message, metrics)
    finally:
        phase("tearing down")
        try:
            _teardown(space, run, handle, metrics, teardown_gpu_timeout_s)
        finally:
            scrub_secrets(space, trial_dir)
    # Once, on the complete log: the start-up memory lines are there whatever happened later.
    run.memory = {**parse_memory_lines(_read(handle.log_path)), **run.read_back}
    return run


def read_back_memory(base_url: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """The server-info endpoint's memory figures plus ``server_info_endpoint`` (the path that
    answered); empty when no endpoint answers."""
    found = fetch_server_info(base_url, headers=headers)
    if found is None:
        return {}
    figures = memory_from_server_info(found[1])
    return {**figures, "server_info_endpoint": found[0]} if figures else {}


def _teardown(space: SearchSpace, run: TrialRun, handle: ServerHandle, metrics: Mapping[str, float],
              gpu_timeout_s: float, attempts: int = 3) -> None:
    """stop_server, shielded from a repeated Ctrl-C/SIGTERM: an interrupt while tearing down
    would otherwise orphan the tree. The interrupt is re-raised once the tree is gone."""
    interrupt: KeyboardInterrupt | None = None
    for _ in range(attempts):
        try:
            report = stop_server(handle, gpu_timeout_s=gpu_timeout_s)
            run.timings["teardown_s"] = report.duration_s
            break
        except TeardownError as exc:
            run.outcome = outcome.failure(space, "teardown_stuck", str(exc), metrics)
            break
        except KeyboardInterrupt as exc:
            interrupt = exc
    if interrupt is not None:
        raise interrupt


def _server_death(handle: ServerHandle, bench_message: str) -> tuple[str, str]:
    """Why the server died under load, from its log: the reason (``oom`` when a forward ran out
    of GPU memory, a memory fault like a start-up OOM, so that what needs as much is not tried
    again; else ``server_died``) and the message: the decisive line first, then the log to
    read; the bench client's view of it (usually connection errors) comes last."""
    _settle_exit(handle)
    text = LogTail(handle.log_path, handle.log_offset).full_text()
    rc = handle.proc.poll()
    what = f"server pid {handle.pid} died during the benchmark" + (f" (rc {rc})" if rc is not None else "")
    reason = Reason.OOM.value if runtime_oom(text) else "server_died"
    return reason, failure_message(decisive_line(text), what, handle.log_path, text) + f"\nbench client: {bench_message}"


def _settle_exit(handle: ServerHandle, settle_s: float = 2.0) -> None:
    """A dying server may still be writing its traceback: give it a moment to exit."""
    try:
        handle.proc.wait(timeout=settle_s)
    except subprocess.TimeoutExpired:
        pass


def _recorder(run: TrialRun, call: Callable[..., None], base_url: str, flags: Mapping[str, Any]) -> bool:
    """One recorder call; False (and the error noted) when the server refused it."""
    try:
        call(base_url, headers=_auth_headers(flags))
    except KttuneError as exc:
        run.recording_error = str(exc)
        return False
    return True


def _api_key(flags: Mapping[str, Any]) -> str | None:
    """The server's api-key, which every request of ours must carry as a bearer token."""
    key = flags.get("api-key")
    return key if isinstance(key, str) and key else None


def _auth_headers(flags: Mapping[str, Any]) -> dict[str, str]:
    key = _api_key(flags)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _bench_auth_env(flags: Mapping[str, Any]) -> dict[str, str]:
    """bench_serving sends OPENAI_API_KEY as its bearer token."""
    key = _api_key(flags)
    return {"OPENAI_API_KEY": key} if key else {}


def scrub_secrets(space: SearchSpace, trial_dir: Path) -> None:
    """Rewrite the trial's files without the secrets once the server is gone: the server
    prints its arguments (server_args=...) into its log and the bench client's result line
    carries the server's info, both with the secret flags' values."""
    if not space.secret_values():
        return
    for path in sorted(p for p in trial_dir.iterdir() if p.is_file()):
        text = _read(path)
        clean = space.redact(text)
        if clean != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(clean)
            os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
