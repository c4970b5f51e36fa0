"""Fault matrix: every fault kttune is built to survive, each through its own `kttune run` on the
simulator (benchmarks/fault_harness.py), with a table of what it cost.

    python benchmarks/fault_matrix.py [--work DIR] [--seed N] [--only SUBSTRING]

Per fault: its classification (the trials' reasons and fault classes), the launches it spent of
the budget, the tuner's wall time, the processes of the run still alive 10 s after the tuner
died (must be 0), the tuner's exit code, and the first line of the first failed trial's
message. A fault can repeat on every launch (the stop rules then end the run), hit one launch
between normal ones, or be a signal sent to the tuner itself. tests/e2e/test_faults_e2e.py runs
the same matrix and asserts on it.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from benchmarks.fault_harness import (  # noqa: E402
    SLOW_START_S,
    STALL_TIMEOUT_S,
    START_TIMEOUT_S,
    STUDY,
    Fault,
    Harness,
    marked_processes,
    prepare,
)

__all__ = ["SLOW_START_S", "STALL_TIMEOUT_S", "START_TIMEOUT_S", "STUDY", "Case", "CaseResult", "Fault", "cases", "marked_processes",
           "prepare", "run_case", "run_matrix", "table"]
TIME_SCALE = 0.005
LEFT_AFTER_S = 10.0
OK = Fault("none", None)


@dataclass(frozen=True)
class Case:
    """One `kttune run`: its launches do ``schedule`` (the last entry repeats)."""

    name: str
    schedule: tuple[Fault, ...]
    budget: int
    expect: str | None  # the first failed trial's reason; None: every trial measured
    expect_rc: int
    expect_launches: int | None = None
    signal: str = ""  # sent to the tuner at the first kill_tuner launch: KILL, TERM, INT, KILL_ALL
    when: str = "start"  # "start": while that server starts; "bench": once its benchmark runs
    server: Mapping[str, Any] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    taken_port: bool = False  # the space's fixed port is held by someone else
    neighbour_gpu: bool = False  # simulated GPUs: ours is GPU 1, a neighbour holds GPU 0


def cases() -> tuple[Case, ...]:
    hang = Fault("hang", "stalled", sim_fault="hang_at_start")
    from tuner.config import QualitySpec

    crash_after = QualitySpec().request_count() + 1 + 2  # the quality guard, the bench warmup, 2 bench requests
    # One faulty launch alone: nothing is measured, so the run ends with exit 3 (kttune's code
    # for that) after classifying it; a fault on every launch shows the stop rules.
    return (
        Case("none (baseline)", (OK,), 1, None, 0, 1),
        Case("crash at start: OOM loading weights", (Fault("oom", "oom_weights", server_args=(
            "--kt-num-gpu-experts", "240")),), 1, "oom_weights", 3, 1),
        Case("crash at start: not enough memory for KV", (Fault("kv", "kv_not_enough_memory", server_args=(
            "--mem-fraction-static", "0.80")),), 1, "kv_not_enough_memory", 3, 1),
        Case("crash at start: OOM allocating KV", (Fault("kv", "oom_kv_alloc", server_args=(
            "--max-total-tokens", "200000")),), 1, "oom_kv_alloc", 3, 1),
        Case("every launch runs out of memory (no stop: a boundary)", (Fault("oom", "oom_weights", server_args=(
            "--kt-num-gpu-experts", "240")),), 4, "oom_weights", 3, 4),
        Case("native crash (segfault) at every start", (Fault("segv", "scheduler_dead", sim_fault="crash_at_start"),),
             5, "scheduler_dead", 1, 3),
        Case("unknown flag (compat check off)", (Fault("flag", "unrecognized_args", server_args=(
            "--kt-amx-weight-path", "/old/flag")),), 3, "unrecognized_args", 1, 1),
        Case("server interpreter missing", (OK,), 3, "exec_failed", 1, 0,
             server={"command": ["/nonexistent/bin/python3", "-m", "sglang.launch_server"]}),
        Case("hang at start, every launch", (hang,), 5, "stalled", 1, 3),
        Case("stall after the KV cache is allocated", (Fault("stall", "stalled", sim_fault="stall_after=kv"),),
             1, "stalled", 3, 1),
        Case("HTTP up, /health never 200", (Fault("unhealthy", "unhealthy", sim_fault="unhealthy"),),
             1, "unhealthy", 3, 1),
        Case("slow start (weights load for longer than the stall timeout)", (Fault(
            "slow", None, sim_fault=f"slow_start={round(SLOW_START_S / TIME_SCALE)}"),), 1, None, 0, 1),
        Case("slow warm-up that logs its batches", (Fault(
            "warmup", None, sim_fault=f"slow_warmup={round(1.5 * STALL_TIMEOUT_S / TIME_SCALE)}"),), 1, None, 0, 1),
        Case("crash during the benchmark, every launch", (Fault("crash", "server_died",
                                                                sim_fault=f"crash_after={crash_after}"),),
             5, "server_died", 1, 3),
        Case("port in use after the model loaded", (Fault("port", "port_in_use", sim_fault="port_in_use"),),
             1, "port_in_use", 3, 1),
        Case("configured port taken before launch", (OK,), 3, "port_in_use", 1, 0, taken_port=True),
        Case("garbage output, every launch", (Fault("garbage", "quality", sim_fault="garbage_output"),),
             5, "quality", 1, 3),
        Case("bench_serving exits non-zero, every launch", (Fault("bench", "bench_no_result", bench="exit1"),),
             5, "bench_no_result", 1, 3),
        Case("environment faults of three kinds in a row", (
            Fault("bench", "bench_no_result", bench="exit1"), Fault("port", "port_in_use", sim_fault="port_in_use"),
            Fault("unhealthy", "unhealthy", sim_fault="unhealthy")), 5, "bench_no_result", 1, 3),
        Case("bench_serving writes no line", (Fault("bench", "bench_no_result", bench="no_line"),),
             1, "bench_no_result", 3, 1),
        Case("bench_serving completes fewer requests", (Fault("bench", "bench_incomplete", bench="incomplete"),),
             1, "bench_incomplete", 3, 1),
        Case("tuner SIGKILLed while a server hangs", (Fault("hang", None, sim_fault="hang_at_start", kill_tuner=True),),
             3, "running", -signal.SIGKILL, 1, signal="KILL"),
        Case("tuner SIGKILLed during a benchmark", (Fault("bench", None, kill_tuner=True),), 3, "running",
             -signal.SIGKILL, 1, signal="KILL", when="bench"),
        Case("tuner and watchdog SIGKILLed together", (Fault("bench", None, kill_tuner=True),), 3, "running",
             -signal.SIGKILL, 1, signal="KILL_ALL", when="bench"),
        Case("tuner SIGTERMed during a benchmark", (Fault("bench", "interrupted", kill_tuner=True),), 3,
             "interrupted", 130, 0, signal="TERM", when="bench"),
        Case("tuner SIGINTed while a server starts", (Fault("hang", "interrupted", sim_fault="hang_at_start",
                                                            kill_tuner=True),), 3, "interrupted", 130, 0,
             signal="INT"),
        Case("neighbour's server holds GPU 0, ours runs on GPU 1", (OK,), 1, None, 0, 1, neighbour_gpu=True),
    )


@dataclass
class CaseResult:
    case: Case
    reasons: list[str]  # per attempted trial, in order ("ok" when measured, "running" if never told)
    classes: list[str]
    launches: int
    wall_s: float
    rc: int
    message: str  # the first failed trial's message, first line
    stderr_tail: str
    storage: str = ""
    left: list[str] = field(default_factory=list)  # processes alive LEFT_AFTER_S after the tuner died
    teardown_s: list[float] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)

    def settle(self, timeout_s: float = LEFT_AFTER_S + 30) -> bool:
        """Wait until `left` is counted (LEFT_AFTER_S after the tuner died); False on timeout."""
        return self._done.wait(timeout_s)

    @property
    def first_failure(self) -> str | None:
        return next((r for r in self.reasons if r != "ok"), None)

    @property
    def classification(self) -> str:
        parts: list[str] = []
        for reason, cls in zip(self.reasons, self.classes):
            label = reason if cls == "" else f"{reason} ({cls})"
            if parts and parts[-1].split(" ×")[0] == label:
                n = int(parts[-1].split(" ×")[1]) + 1 if " ×" in parts[-1] else 2
                parts[-1] = f"{label} ×{n}"
            else:
                parts.append(label)
        return ", ".join(parts) or "-"

    @property
    def ok(self) -> bool:
        c = self.case
        launches_ok = c.expect_launches is None or self.launches == c.expect_launches
        return (self.first_failure == c.expect and self.rc == c.expect_rc and launches_ok and not self.left
                and self._done.is_set())


def _classes(reason: str) -> str:
    from tuner.outcome import fault_of

    return "" if reason in ("ok", "running") else fault_of(reason).value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _trigger(h: Harness, case: Case, proc: subprocess.Popen[bytes]) -> None:
    """Wait for the moment `case.signal` is due, then send it."""
    k = next(i for i, f in enumerate(h.schedule) if f.kill_tuner)
    launch = h.state / f"launch-{k:03d}.json"
    if not _wait(launch.exists, proc, 120):
        return
    if case.when == "bench":
        import json

        trial_dir = Path(json.loads(launch.read_text())["trial_dir"])
        if not _wait(lambda: (trial_dir / "bench-decode.argv.json").exists(), proc, 120):
            return
        time.sleep(0.5)
    else:
        time.sleep(1.5)  # the server is up and starting (or hanging); the trial is RUNNING
    sig = {"KILL": signal.SIGKILL, "KILL_ALL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
    if case.signal == "KILL_ALL":  # as `kill -9` of every kttune process would: the watchdog too
        import json

        pid_file = Path(json.loads(launch.read_text())["trial_dir"]) / "server.pid"
        os.kill(int(json.loads(pid_file.read_text())["pid"]), signal.SIGKILL)
    os.kill(proc.pid, sig[case.signal])


def _neighbour(work: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Another worker's server on GPU 0: a process holding 40 GiB there until it is killed."""
    code = ("import os, sys, time\nfrom pathlib import Path\nfrom tuner.machine import hold_sim_gpu_memory\n"
            "hold_sim_gpu_memory(Path(sys.argv[1]), os.getpid(), {sys.argv[2]: 40 << 30})\n"
            "print('holding', flush=True)\ntime.sleep(600)\n")
    return subprocess.Popen([sys.executable, "-c", code, str(work / "gpus"), "GPU-0-sim-neighbour"], cwd=REPO,
                            env={**os.environ, **env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)


def run_case(case: Case, work: Path, *, seed: int = 0, timeout_s: float = 600) -> CaseResult:
    """Run one case; its `left` count is filled LEFT_AFTER_S after the tuner died (`settle`)."""
    work.mkdir(parents=True, exist_ok=True)
    server, env, holder, sock = dict(case.server), {}, None, None
    if case.taken_port:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server["port"] = sock.getsockname()[1]
    if case.neighbour_gpu:
        from tuner.machine import write_sim_gpus

        write_sim_gpus(work / "gpus", [{"uuid": u, "name": "Simulated L20", "total": 48 << 30, "base_used": 1 << 29}
                                       for u in ("GPU-0-sim-neighbour", "GPU-1-sim-ours")])
        env["KTTUNE_SIM_NVML"] = str(work / "gpus")
        server["env"] = {"CUDA_VISIBLE_DEVICES": "GPU-1-sim-ours"}
    h = prepare(work, case.schedule, time_scale=TIME_SCALE, budget=case.budget, server=server, env=env,
                extra_args=("--no-compat-check", *case.extra_args))
    log_path = work / "run.log"
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        # Started in the background (`cmd &` ignores SIGINT, and children inherit that): the
        # tuner must get SIGINT the way Ctrl-C delivers it in a terminal.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", *h.cli_args(), "--seed", str(seed)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **h.env}, start_new_session=True)
    try:
        if case.neighbour_gpu:
            _wait((h.state / "launch-000.json").exists, proc, 120)
            holder = _neighbour(work, env)  # after our launch: our baseline does not include it
        if case.signal:
            _trigger(h, case, proc)
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        if sock is not None:
            sock.close()
    died, wall = time.monotonic(), time.monotonic() - started
    result = _collect(h, case, rc, wall, log_path)
    threading.Timer(max(0.0, died + LEFT_AFTER_S - time.monotonic()), _count_left, (h, result, holder)).start()
    return result


def _count_left(h: Harness, result: CaseResult, holder: subprocess.Popen[bytes] | None) -> None:
    result.left = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in marked_processes(h.marker)]
    if holder is not None:
        holder.kill()
        holder.wait()
    result._done.set()


def _collect(h: Harness, case: Case, rc: int, wall: float, log_path: Path) -> CaseResult:
    from tuner.storage import ATTR_REASON, ATTR_TRIAL_DIR, launched_count, timings_of

    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    try:
        trials = optuna.load_study(study_name=STUDY, storage=h.storage).get_trials()
    except Exception:  # refused before the study was written
        trials = []
    attempted = [t for t in trials if t.user_attrs.get(ATTR_TRIAL_DIR)]
    reasons = []
    for t in attempted:
        reason = t.user_attrs.get(ATTR_REASON)
        reasons.append("running" if not t.state.is_finished() else (reason or "ok"))
    failed = next((t for t in attempted if t.user_attrs.get(ATTR_REASON)), None)
    message = str(failed.user_attrs.get("message", "")).splitlines()[0] if failed is not None else ""
    return CaseResult(case, reasons, [_classes(r) for r in reasons], launched_count(trials), wall, rc,
                      message, "\n".join(tail), h.storage,
                      teardown_s=[timings_of(t)["teardown_s"] for t in attempted if "teardown_s" in timings_of(t)])


def table(results: Sequence[CaseResult]) -> str:
    """The matrix as a Markdown table (what docs show)."""
    head = "| fault | classification | launches | time | left after 10 s | exit | message (first line) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        msg = r.message.replace("|", "\\|")
        msg = msg if len(msg) <= 110 else msg[:107] + "..."
        mark = "" if r.ok else " **(unexpected)**"
        lines.append(f"| {r.case.name}{mark} | {r.classification} | {r.launches}/{r.case.budget} | {r.wall_s:.0f} s "
                     f"| {len(r.left)} | {r.rc} | {msg or '-'} |")
    return "\n".join(lines)


def run_matrix(work: Path, selected: Sequence[Case] | None = None, *, seed: int = 0,
               log: Callable[[str], None] = print) -> list[CaseResult]:
    results = []
    for i, case in enumerate(selected if selected is not None else cases()):
        res = run_case(case, work / f"case-{i:02d}", seed=seed)
        log(f"{case.name}: {res.classification}, rc {res.rc}, {res.launches} launch(es), {res.wall_s:.0f} s")
        results.append(res)
    for res in results:
        res.settle()
    log(table(results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a fresh temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    ns = parser.parse_args(argv)
    import tempfile

    work = ns.work or Path(tempfile.mkdtemp(prefix="kttune-faults-"))
    chosen = [c for c in cases() if ns.only in c.name]
    results = run_matrix(work, chosen, seed=ns.seed)
    bad = [r.case.name for r in results if not r.ok]
    print(f"work dir: {work}; {len(results) - len(bad)}/{len(results)} as expected" + (f"; not: {bad}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
