"""GPU-memory probe and release check on a real NVIDIA GPU (needs torch + nvidia-ml-py).

Launches a stand-in "server" through kttune's own start_server: it allocates GPU memory in
itself and in a child, announces ready, and waits. Then prints what NVML sees (tuner.machine.gpu),
tears the tree down with stop_server (which waits for NVML to show the memory released) and
prints the timings. A second round SIGKILLs the launching "tuner" process instead and checks
that the die-with-tuner shim frees the GPU too. Prints figures; not a test.

    python benchmarks/gpu_teardown_check.py [--gib 8]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tuner.machine import gpu_processes, probe_gpus, used_bytes_total
from tuner.server import find_free_port, kill_orphan, start_server, stop_server, wait_ready

GIB = 1 << 30
SERVER = textwrap.dedent("""
    import subprocess, sys, time, torch
    gib = float(sys.argv[1])
    x = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda")
    child = subprocess.Popen([sys.executable, "-c",
        "import torch, time; y = torch.empty(1 << 30, dtype=torch.uint8, device='cuda'); time.sleep(600)"])
    time.sleep(3)
    print("The server is fired up and ready to roll!", flush=True)
    time.sleep(600)
""")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=8.0)
    args = ap.parse_args()
    gpus = probe_gpus()
    if not gpus:
        print("no GPU visible through NVML")
        return 1
    print("GPUs:", ", ".join(f"{g.index}:{g.name} {g.total_bytes / GIB:.1f} GiB, used {g.used_bytes / GIB:.2f}" for g in gpus))
    work = Path(tempfile.mkdtemp(prefix="kttune-gpu-"))
    script = work / "server.py"
    script.write_text(SERVER)
    before = used_bytes_total() or 0
    port = find_free_port()
    t0 = time.monotonic()
    h = start_server([sys.executable, str(script), str(args.gib)], log_path=work / "server.log", host="127.0.0.1", port=port)
    ready = wait_ready(h, timeout_s=120)
    used = used_bytes_total() or 0
    procs = gpu_processes()
    print(f"round 1: ready in {ready:.1f}s; used {before / GIB:.2f} -> {used / GIB:.2f} GiB; NVML processes {procs}")
    print(f"  server pid {h.pid} listed by NVML: {h.pid in procs}; tree pids on GPU: {len(procs)}")
    report = stop_server(h, baseline_gpu_used=before, gpu_timeout_s=60)
    print(f"  stop_server: {report.duration_s:.2f}s, signals {report.signals_sent}, gpu_released {report.gpu_released}, "
          f"leftover {report.leftover_pids}; used now {(used_bytes_total() or 0) / GIB:.2f} GiB")
    # Round 2: the tuner itself is SIGKILLed with a server holding GPU memory.
    tuner_code = (f"import sys; sys.path.insert(0, {str(Path.cwd())!r})\n"
                  "from pathlib import Path; import time\nfrom tuner.server import start_server, wait_ready\n"
                  f"h = start_server([sys.executable, {str(script)!r}, '{args.gib}'], log_path=Path({str(work / 's2.log')!r}),"
                  f" host='127.0.0.1', port={find_free_port()})\nwait_ready(h, timeout_s=120)\nprint(h.pid, flush=True)\ntime.sleep(600)\n")
    tuner = subprocess.Popen([sys.executable, "-c", tuner_code], stdout=subprocess.PIPE, text=True)
    pid = int(tuner.stdout.readline())
    held = used_bytes_total() or 0
    tuner.kill()
    tuner.wait()
    t1 = time.monotonic()
    while time.monotonic() - t1 < 30 and pid in gpu_processes():
        time.sleep(0.05)
    print(f"round 2: tuner SIGKILLed while server {pid} held {held / GIB:.2f} GiB; the server left NVML after "
          f"{time.monotonic() - t1:.2f}s; used now {(used_bytes_total() or 0) / GIB:.2f} GiB; NVML processes {gpu_processes()}")
    # This stand-in's own child has no PDEATHSIG (real SGLang children do); the next run's
    # recovery finds what is left through the trial's pid file (session, process group, token).
    t2 = time.monotonic()
    killed = kill_orphan(work / "server.pid", gpu_timeout_s=60)
    print(f"round 3: kill_orphan(server.pid) signalled={killed} in {time.monotonic() - t2:.2f}s; used now "
          f"{(used_bytes_total() or 0) / GIB:.2f} GiB (before the study: {before / GIB:.2f}); NVML processes {gpu_processes()}")
    print(f"total {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
