"""Fault matrix: drive every fault row through `kttune run` on the simulator, then print
faults injected / survived / trials lost / orphans.

    python benchmarks/fault_matrix.py [--work DIR] [--seed N]

One study runs the whole matrix. The server command is a small wrapper that counts launches
and, per launch, picks the scheduled fault (a `--sim-fault` switch, or flags that make the
simulated model run out of memory) before exec'ing `python -m tuner.sim` in place (same
PID, same process tree). The bench interpreter is a wrapper too: it runs the real
`sglang.bench_serving` client, or imitates a broken one (exit 1, no result line, fewer
completed requests). In the middle of the schedule the tuner itself is SIGKILLed while a
hung server starts; a second `kttune run` must recover and finish the budget.
tests/test_faults_e2e.py runs the same matrix and asserts on the result.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from tuner.config import QualitySpec  # noqa: E402

SIM_SPACE = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml"
MARKER_ENV = "KTTUNE_FAULT_MARKER"
DIR_ENV = "KTTUNE_FAULT_DIR"
STUDY = "faults"
NUM_PROMPTS = 8
START_TIMEOUT_S = 20.0  # a normal start takes 2-4 s here, the slow one ~6 s more
SLOW_START_S = 6.0


@dataclass(frozen=True)
class Fault:
    """One scheduled launch. ``expect`` is the trial's reason (None: a normal trial)."""

    name: str
    expect: str | None
    sim_fault: str = ""
    server_args: tuple[str, ...] = ()
    bench: str = ""  # "" (real client) | "exit1" | "no_line" | "incomplete"
    kill_tuner: bool = False

    @property
    def injected(self) -> bool:
        return self.expect is not None


def default_schedule(*, time_scale: float, quality_requests: int) -> tuple[Fault, ...]:
    """Every row of the fault matrix once, between normal launches. ``quality_requests`` is
    how many generate requests the quality guard sends first (the simulator counts them)."""
    crash_after = quality_requests + 1 + 2  # quality probes, bench warmup, then 2 bench requests
    return (
        Fault("none (baseline)", None),
        Fault("crash at start: OOM (weights)", "oom_weights", server_args=("--kt-num-gpu-experts", "240")),
        Fault("crash at start: not enough memory for KV", "kv_not_enough_memory",
              server_args=("--mem-fraction-static", "0.80")),
        Fault("crash at start: OOM at KV allocation", "oom_kv_alloc", server_args=("--max-total-tokens", "200000")),
        Fault("crash at start: native scheduler crash", "scheduler_dead", sim_fault="crash_at_start"),
        Fault("hang at start (start timeout)", "start_timeout", sim_fault="hang_at_start"),
        Fault("tuner SIGKILLed while a server hangs", "interrupted", sim_fault="hang_at_start", kill_tuner=True),
        Fault("slow start within the timeout", None, sim_fault=f"slow_start={round(SLOW_START_S / time_scale)}"),
        Fault("crash during the benchmark", "server_died", sim_fault=f"crash_after={crash_after}"),
        Fault("port in use after load", "port_in_use", sim_fault="port_in_use"),
        Fault("output quality failure", "quality", sim_fault="garbage_output"),
        Fault("bench_serving exits non-zero", "bench_no_result", bench="exit1"),
        Fault("bench_serving writes no line", "bench_no_result", bench="no_line"),
        Fault("bench_serving completes fewer requests", "bench_incomplete", bench="incomplete"),
        Fault("none", None),
    )


_SERVER_WRAPPER = r'''"""kttune fault harness: pick this launch's fault, then become `python -m tuner.sim`."""
import fcntl, json, os, sys

argv = sys.argv[1:]
target = [sys.executable, "-m", "tuner.sim"]
if "--help" in argv or "-h" in argv:
    os.execv(sys.executable, target + argv)
root = os.environ["KTTUNE_FAULT_DIR"]
with open(os.path.join(root, "counter.lock"), "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = os.path.join(root, "counter")
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
schedule = json.load(open(os.path.join(root, "schedule.json")))
fault = schedule[n] if n < len(schedule) else {"name": "none (after the schedule)", "expect": None}
try:
    log = os.readlink("/proc/self/fd/1")
except OSError:
    log = ""
record = {"launch": n, "fault": fault, "trial_dir": os.path.dirname(log), "pid": os.getpid()}
for name in ("launch-%03d.json" % n, "current.json"):
    tmp = os.path.join(root, "." + name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(root, name))
os.environ["KTTUNE_SIM_FAULT"] = fault.get("sim_fault", "")
os.execv(sys.executable, target + argv + list(fault.get("server_args", [])))
'''

_BENCH_WRAPPER = r'''#!{python}
"""kttune fault harness: the real bench client, or an imitation of a broken one."""
import json, os, sys

REAL = {real!r}
args = sys.argv[1:]
if "--output-file" not in args:  # --help, probes: the real interpreter answers
    os.execv(REAL, [REAL] + args)
current = json.load(open(os.path.join(os.environ["KTTUNE_FAULT_DIR"], "current.json")))
mode = current["fault"].get("bench", "")
out = args[args.index("--output-file") + 1]
asked = int(args[args.index("--num-prompts") + 1])
if mode == "exit1":
    sys.stderr.write("Traceback (most recent call last):\nRuntimeError: injected bench_serving failure\n")
    sys.exit(1)
if mode == "no_line":
    print("benchmark finished (injected: no result line)")
    sys.exit(0)
if mode == "incomplete":
    line = {{"backend": "sglang", "completed": asked - 3, "output_throughput": 1.0, "input_throughput": 1.0,
             "duration": 1.0, "median_itl_ms": 1.0, "median_ttft_ms": 1.0, "p99_itl_ms": 1.0, "p99_ttft_ms": 1.0}}
    with open(out, "a") as f:
        f.write(json.dumps(line) + "\n")
    sys.exit(0)
os.execv(REAL, [REAL] + args)
'''


@dataclass(frozen=True)
class Harness:
    work: Path
    space: Path
    marker: str
    schedule: tuple[Fault, ...]

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.work / 'faults.db'}"

    @property
    def state(self) -> Path:
        return self.work / "fault-state"

    @property
    def budget(self) -> int:
        return sum(1 for f in self.schedule if not f.kill_tuner)

    def cli_args(self) -> list[str]:
        return ["run", "--space", str(self.space), "--study", STUDY, "--storage", self.storage,
                "--studies-dir", str(self.work / "studies"), "--budget", str(self.budget), "--no-feasibility"]

    def launches(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.state.glob("launch-*.json"))]


def bench_python() -> Path:
    return REPO / ".venv-bench" / "bin" / "python"


def prepare(work: Path, schedule: Sequence[Fault] | None = None, *, time_scale: float = 0.005,
            start_timeout_s: float = START_TIMEOUT_S) -> Harness:
    """Write the wrappers, the schedule and a small fast space under ``work``."""
    work = work.resolve()
    quality = QualitySpec()
    schedule = tuple(schedule or default_schedule(time_scale=time_scale, quality_requests=quality.request_count()))
    state = work / "fault-state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "schedule.json").write_text(json.dumps([f.__dict__ for f in schedule]))
    server = work / "fault_server.py"
    server.write_text(_SERVER_WRAPPER)
    bench = work / "fault_bench"
    bench.write_text(_BENCH_WRAPPER.format(python=sys.executable, real=str(bench_python())))
    bench.chmod(0o755)
    marker = f"kttune-faults-{work.name}-{os.getpid()}"
    (work / "marker").write_text(marker)  # lets a test kill what a failed run left behind
    env = {DIR_ENV: str(state), MARKER_ENV: marker}
    data = yaml.safe_load(SIM_SPACE.read_text())
    srv = data["server"]
    srv.pop("module", None)
    srv["command"] = [sys.executable, str(server)]
    srv["start_timeout_s"] = start_timeout_s
    srv["env"] = env
    srv["args"].update({"sim-time-scale": time_scale, "kt-num-gpu-experts": 200, "kt-threadpool-count": 2,
                        "chunked-prefill-size": 4096})
    data["params"] = {"kt-cpuinfer": {"low": 40, "high": 56, "step": 4},
                      "max-running-requests": {"low": 16, "high": 37}}
    data["baseline"] = {"kt-cpuinfer": 56, "max-running-requests": 37}
    data["workloads"] = {"decode": {"num_prompts": NUM_PROMPTS, "input_len": 10, "output_len": 32}}
    data["bench"].update({"python": str(bench), "time_scale": time_scale, "timeout_s": 120,
                          "env": {**data["bench"].get("env", {}), **env}})
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    return Harness(work, space, marker, schedule)


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes started for this harness (the marker is in their environment)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARKER_ENV) == marker:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


@dataclass
class Row:
    launch: int
    fault: str
    expected: str | None
    got: str | None
    trial: int | None
    state: str

    @property
    def ok(self) -> bool:
        return self.got == self.expected


@dataclass
class MatrixResult:
    rows: list[Row]
    budget: int
    counted_launches: int
    exit_codes: list[int]
    lost: int
    orphans: list[str]
    pid_files: list[str]
    wall_s: float
    slow_ready_s: float | None = None
    log: list[str] = field(default_factory=list)

    @property
    def injected(self) -> int:
        return sum(1 for r in self.rows if r.expected is not None)

    @property
    def survived(self) -> int:
        """Faults classified as scheduled while the study still reached its budget."""
        if self.counted_launches < self.budget:
            return 0
        return sum(1 for r in self.rows if r.expected is not None and r.ok)

    def summary(self) -> str:
        width = max(len(r.fault) for r in self.rows)
        lines = [f"{'launch':>6}  {'fault':<{width}}  {'expected':<22} {'got':<22} trial"]
        for r in self.rows:
            mark = "" if r.ok else "   <-- MISMATCH"
            lines.append(f"{r.launch:>6}  {r.fault:<{width}}  {str(r.expected):<22} {str(r.got):<22} "
                         f"{r.trial if r.trial is not None else '-'}{mark}")
        lines.append(f"faults injected: {self.injected}   survived: {self.survived}   "
                     f"trials lost: {self.lost}   orphans: {len(self.orphans)}   "
                     f"(budget {self.counted_launches}/{self.budget}, exit codes {self.exit_codes}, "
                     f"{self.wall_s:.0f} s)")
        return "\n".join(lines)


def _kttune(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tuner.cli", *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _finished(h: Harness) -> dict[int, tuple[str, Any]]:
    study = optuna.load_study(study_name=STUDY, storage=h.storage)
    return {t.number: (t.state.name, t.values) for t in study.get_trials() if t.state.is_finished()}


def run_matrix(work: Path, schedule: Sequence[Fault] | None = None, *, seed: int = 0,
               timeout_s: float = 900, log: Callable[[str], None] = print) -> MatrixResult:
    """Run the matrix (first run, SIGKILL at the kill_tuner launch, second run) and collect."""
    started = time.monotonic()
    h = prepare(work, schedule)
    args = [*h.cli_args(), "--seed", str(seed)]
    kill_at = next((i for i, f in enumerate(h.schedule) if f.kill_tuner), None)
    codes: list[int] = []
    before: dict[int, tuple[str, Any]] = {}
    deadline = started + timeout_s
    try:
        proc = _kttune(args, work / "run-1.log")
        if kill_at is not None:
            while not (h.state / f"launch-{kill_at:03d}.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"first run ended before launch {kill_at}: "
                                       + (work / "run-1.log").read_text()[-3000:])
                time.sleep(0.2)
            time.sleep(1.5)  # the server is up and hanging; the trial is RUNNING
            before = _finished(h)
            os.kill(proc.pid, signal.SIGKILL)  # the tuner only: its server is orphaned
            log(f"tuner SIGKILLed during launch {kill_at}; {len(before)} finished trials so far")
        codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        if kill_at is not None:
            proc = _kttune(args, work / "run-2.log")
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)  # let exiting children be reaped before counting orphans
    orphans = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in marked_processes(h.marker)]
    return _collect(h, codes, before, orphans, time.monotonic() - started, log)


def _collect(h: Harness, codes: list[int], before: dict[int, tuple[str, Any]], orphans: list[str],
             wall_s: float, log: Callable[[str], None]) -> MatrixResult:
    from tuner.storage import ATTR_LAUNCHED, ATTR_REASON, ATTR_TRIAL_DIR, launched_count, timings_of

    study = optuna.load_study(study_name=STUDY, storage=h.storage)
    trials = study.get_trials()
    by_dir = {str(t.user_attrs.get(ATTR_TRIAL_DIR)): t for t in trials if t.user_attrs.get(ATTR_LAUNCHED)}
    rows, slow_ready = [], None
    for rec in h.launches():
        t = by_dir.get(rec["trial_dir"])
        fault = rec["fault"]
        rows.append(Row(rec["launch"], fault["name"], fault["expect"],
                        t.user_attrs.get(ATTR_REASON) if t else "<no trial>",
                        t.number if t else None, t.state.name if t else "-"))
        if t is not None and fault.get("sim_fault", "").startswith("slow_start"):
            slow_ready = timings_of(t).get("ready_s")
    after = {t.number: (t.state.name, t.values) for t in trials if t.state.is_finished()}
    lost = sum(1 for n, v in before.items() if after.get(n) != v)
    pid_files = [str(p) for p in (h.work / "studies").rglob("server.pid")]
    result = MatrixResult(rows, h.budget, launched_count(trials), codes, lost, orphans, pid_files, wall_s,
                          slow_ready)
    log(result.summary())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a fresh temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    import tempfile

    work = ns.work or Path(tempfile.mkdtemp(prefix="kttune-faults-"))
    res = run_matrix(work, seed=ns.seed)
    print(f"work dir: {work}")
    clean = res.survived == res.injected and res.lost == 0 and not res.orphans
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
