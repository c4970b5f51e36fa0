#!/usr/bin/env bash
# Create a torch-free virtual environment holding the real sglang-kt 0.7.2
# bench_serving client (python -m sglang.bench_serving) and only its runtime deps.
#
# usage: scripts/bench-venv.sh [VENV_DIR]     (default: <repo>/.venv-bench)
# env:   PYTHON  interpreter that creates the venv (default: python3)
#
# sglang-kt is installed with --no-deps: its declared deps pull torch, CUDA
# and kernel packages that the client never imports.  What the client imports:
#   sglang/bench_serving.py       aiohttp numpy requests tqdm transformers
#   sglang/benchmark/datasets/*   datasets (mmmu.py, imported unconditionally)
#                                 pybase64, pillow (image.py, mmmu.py)
#   sglang/__init__.py -> utils   IPython
# transformers is pinned to 5.6.0, the upstream base of the transformers-kt
# 5.6.0.post6 that sglang-kt 0.7.2 requires (the -kt wheel adds a ~90 MB kernel
# payload the client does not use).  Idempotent: exits early if the venv works.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-bench}"
python="${PYTHON:-python3}"

check() {
    "$venv/bin/python" -c 'import sglang.bench_serving' >/dev/null 2>&1
}

if [[ -x "$venv/bin/python" ]] && check; then
    echo "bench venv ready: $venv"
    exit 0
fi

"$python" -m venv "$venv"
# Deps first, then sglang-kt without deps, so pip never resolves sglang-kt's
# torch/CUDA requirements.
"$venv/bin/python" -m pip install -q \
    "transformers==5.6.0" aiohttp numpy requests tqdm pybase64 pillow datasets IPython
"$venv/bin/python" -m pip install -q --no-deps "sglang-kt==0.7.2"

if ! check; then
    echo "bench venv at $venv cannot import sglang.bench_serving:" >&2
    "$venv/bin/python" -c 'import sglang.bench_serving' >&2 || true
    exit 1
fi
echo "bench venv ready: $venv"
