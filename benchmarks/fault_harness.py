"""The fault harness under benchmarks/fault_matrix.py and tests/e2e/test_faults_e2e.py: a small,
fast space on the simulator whose server command is a wrapper that counts launches and, per
launch, picks the scheduled fault (a `--sim-fault` switch, extra flags) before exec'ing
`python -m tuner.sim` in place; the bench interpreter is a wrapper too, running the real
`sglang.bench_serving` client or imitating a broken one (exit 1, no result line, fewer
completed requests). Every process it starts carries a marker in its environment, so what is
left behind can be counted.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
SIM_SPACE = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20.yaml"
MARKER_ENV = "KTTUNE_FAULT_MARKER"
DIR_ENV = "KTTUNE_FAULT_DIR"
STUDY = "faults"
NUM_PROMPTS = 8
START_TIMEOUT_S = 30.0  # a normal start takes 2-4 s here, the slow one ~10 s more
STALL_TIMEOUT_S = 8.0  # well above the simulator's silence before its first line on a busy machine
SLOW_START_S = 10.0


@dataclass(frozen=True)
class Fault:
    """What one launch does. ``expect`` is the trial's reason (None: a normal trial)."""

    name: str
    expect: str | None
    sim_fault: str = ""
    server_args: tuple[str, ...] = ()
    bench: str = ""  # "" (real client) | "exit1" | "no_line" | "incomplete"
    kill_tuner: bool = False

    @property
    def injected(self) -> bool:
        return self.expect is not None


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
fault = schedule[min(n, len(schedule) - 1)]  # the last one repeats
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
    budget: int
    env: Mapping[str, str] = field(default_factory=dict)  # added to the tuner's environment
    extra_args: tuple[str, ...] = ()

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.work / 'faults.db'}"

    @property
    def state(self) -> Path:
        return self.work / "fault-state"

    def cli_args(self) -> list[str]:
        return ["run", "--space", str(self.space), "--study", STUDY, "--storage", self.storage,
                "--studies-dir", str(self.work / "studies"), "--budget", str(self.budget), "--no-feasibility",
                *self.extra_args]

    def launches(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.state.glob("launch-*.json"))]


def bench_python() -> Path:
    return REPO / ".venv-bench" / "bin" / "python"


def prepare(work: Path, schedule: Sequence[Fault], *, time_scale: float = 0.005,
            start_timeout_s: float = START_TIMEOUT_S, stall_timeout_s: float = STALL_TIMEOUT_S,
            budget: int | None = None, server: Mapping[str, Any] | None = None,
            env: Mapping[str, str] | None = None, extra_args: Sequence[str] = ()) -> Harness:
    """Write the wrappers, the schedule and a small fast space under ``work``. ``server``
    overrides keys of the space's `server` block (a fixed port, a command that cannot run,
    an `env` for the server); ``env`` is added to the tuner's and the server's environment."""
    work = work.resolve()
    schedule = tuple(schedule)
    state = work / "fault-state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "schedule.json").write_text(json.dumps([f.__dict__ for f in schedule]))
    wrapper = work / "fault_server.py"
    wrapper.write_text(_SERVER_WRAPPER)
    bench = work / "fault_bench"
    bench.write_text(_BENCH_WRAPPER.format(python=sys.executable, real=str(bench_python())))
    bench.chmod(0o755)
    marker = f"kttune-faults-{work.name}-{os.getpid()}"
    (work / "marker").write_text(marker)  # lets a test kill what a failed run left behind
    # The tuner's environment: its own registry of launches (tuner.server.registry), and `env`.
    tuner_env = {"KTTUNE_RUNTIME_DIR": str(work / "runtime"), **(env or {})}
    tagged = {DIR_ENV: str(state), MARKER_ENV: marker, **tuner_env}
    data = yaml.safe_load(SIM_SPACE.read_text())
    srv = data["server"]
    srv.pop("module", None)
    srv["command"] = [sys.executable, str(wrapper)]
    srv["start_timeout_s"] = start_timeout_s
    srv["stall_timeout_s"] = stall_timeout_s
    srv["env"] = dict(tagged)
    srv["args"].update({"sim-time-scale": time_scale, "kt-num-gpu-experts": 200, "kt-threadpool-count": 2,
                        "chunked-prefill-size": 4096})
    for key, value in (server or {}).items():
        srv[key] = {**srv["env"], **value} if key == "env" else value
    data["params"] = {"kt-cpuinfer": {"low": 40, "high": 56, "step": 4},
                      "max-running-requests": {"low": 16, "high": 37}}
    data["baseline"] = {"kt-cpuinfer": 56, "max-running-requests": 37}
    data["workloads"] = {"decode": {"num_prompts": NUM_PROMPTS, "input_len": 10, "output_len": 32}}
    data["probe"] = {"fraction": 0}  # one bench run per launch: the faults are the point here
    data["bench"].update({"python": str(bench), "time_scale": time_scale, "timeout_s": 120,
                          "env": {**data["bench"].get("env", {}), **tagged}})
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    runs = budget if budget is not None else sum(1 for f in schedule if not f.kill_tuner)
    return Harness(work, space, marker, schedule, runs, tuner_env, tuple(extra_args))


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
