#!/usr/bin/env bash
# A throwaway venv (default .cache/upstream-venv, git-ignored) with upstream sglang 0.5.23
# installed --no-deps, a CPU torch, and the small packages that importing
# sglang.srt.server_args (ServerArgs.add_cli_args) and its --config merger needs: enough to run
# upstream's own argument parser on a CPU, never a server. Idempotent.
#
# usage: scripts/upstream-venv.sh [VENV_DIR]     env: PYTHON (default: python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${1:-.cache/upstream-venv}"
check() {
    "$venv/bin/python" -W ignore -c 'import argparse
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger
ServerArgs.add_cli_args(argparse.ArgumentParser())' >/dev/null 2>&1
}
if [[ -x "$venv/bin/python" ]] && check; then
    echo "upstream venv ready: $venv"
    exit 0
fi
wheel="$(bash scripts/fetch-upstream-sglang.sh)"
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --no-deps "$wheel"
# sglang 0.5.23 pins torch 2.14.1 (CUDA); the parser only needs a torch to import.
"${pip[@]}" torch==2.13.0
# What the import chain of srt/server_args.py and srt/utils/server_args_config_parser.py asks for.
"${pip[@]}" numpy orjson psutil pybase64 requests triton packaging pillow starlette msgspec pydantic \
    pyzmq tqdm IPython aiohttp pyyaml
check || { echo "upstream venv $venv cannot build sglang's parser" >&2; exit 1; }
echo "upstream venv ready: $venv"
