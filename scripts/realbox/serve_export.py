"""Relaunches an exported profile with the real server's own ``--config`` (as a user deploys
it), waits until it serves, sends one generation request, saves the ``/server_info`` payload
and the log, and stops the server's whole process group. Exit 0 when it served.

Usage: python3 serve_export.py PROFILE.yaml OUTDIR [--port 30111] [--timeout 420]
The server's environment is the bundle's (PYTHONPATH=/tmp/sgkt, as the realbox space sets it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUNDLE_ENV = {"PYTHONPATH": "/tmp/sgkt", "LD_LIBRARY_PATH": "/tmp/sgkt/_ktlibs", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}


def get(url: str, data: dict | None = None, timeout: float = 30) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--port", type=int, default=30111)
    ap.add_argument("--timeout", type=float, default=420)
    a = ap.parse_args()
    a.outdir.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{a.port}"
    argv = [sys.executable, "-m", "sglang.launch_server", "--config", str(a.profile), "--host", "127.0.0.1",
            "--port", str(a.port)]
    t0 = time.monotonic()
    with open(a.outdir / "export-relaunch.server.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **BUNDLE_ENV},
                                start_new_session=True)
    served = False
    try:
        while time.monotonic() - t0 < a.timeout and proc.poll() is None:
            try:
                get(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        if proc.poll() is None and time.monotonic() - t0 < a.timeout:
            ready_s = time.monotonic() - t0
            out = json.loads(get(base + "/generate", {"text": "the quick brown fox", "sampling_params": {"max_new_tokens": 16}}))
            (a.outdir / "server_info.json").write_bytes(get(base + "/server_info"))
            served = len(out.get("meta_info", {}).get("output_ids", out.get("output_ids", [])) or []) > 0 or bool(out.get("text"))
            print(f"relaunch with --config {a.profile}: ready after {ready_s:.0f} s; /generate -> {json.dumps(out)[:300]}")
        else:
            print(f"relaunch with --config {a.profile}: not ready (rc={proc.poll()}) after {time.monotonic() - t0:.0f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return 0 if served else 1


if __name__ == "__main__":
    sys.exit(main())
