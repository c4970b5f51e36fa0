#!/usr/bin/env bash
# Idempotent set-up of a fresh checkout: kttune in .venv (with test extras) and the real
# sglang bench_serving client in .venv-bench (scripts/bench-venv.sh). Safe to re-run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c 'import tuner, optuna, pytest, xdist, tokenizers, matplotlib, sklearn, psycopg2, mypy, ruff' >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,report]'
fi
bash scripts/bench-venv.sh .venv-bench
# .venv-kt: kt-kernel's CPU kernels for `kttune cpubench` and its tests (server.python on a
# serving machine already has them). --no-deps: kt-kernel pins a CUDA torch; the CPU build
# of torch 2.13.0 is enough for its Python side (a plain `torch` would fetch a CUDA build).
if ! .venv-kt/bin/python -c 'import kt_kernel, numpy' >/dev/null 2>&1; then
    "$python" -m venv .venv-kt
    .venv-kt/bin/python -m pip install -q torch==2.13.0 numpy safetensors gguf
    .venv-kt/bin/python -m pip install -q --no-deps kt-kernel==0.7.2
fi
