#!/usr/bin/env bash
# A throwaway venv (git-ignored, under .cache/) with one SGLang package installed --no-deps, a CPU
# torch, and the small packages that importing sglang.srt.server_args (ServerArgs.add_cli_args)
# and its --config merger needs: enough to run that server's own argument parser on a CPU, never
# a server. Idempotent.
#
#   upstream   sglang 0.5.23 (the wheel scripts/fetch-upstream-sglang.sh fetches) → .cache/upstream-venv
#   sglang-kt  sglang-kt 0.7.2, KTransformers' fork                                 → .cache/sglang-kt-venv
#
# usage: scripts/parser-venv.sh upstream|sglang-kt [VENV_DIR]     env: PYTHON (default: python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
which="${1:?usage: scripts/parser-venv.sh upstream|sglang-kt [VENV_DIR]}"
case "$which" in
    upstream) venv="${2:-.cache/upstream-venv}"; merger=sglang.srt.utils.server_args_config_parser ;;
    sglang-kt) venv="${2:-.cache/sglang-kt-venv}"; merger=sglang.srt.server_args_config_parser ;;
    *) echo "scripts/parser-venv.sh: the package is 'upstream' or 'sglang-kt', not '$which'" >&2; exit 2 ;;
esac
check() {
    "$venv/bin/python" -W ignore -c "import argparse
from sglang.srt.server_args import ServerArgs
from $merger import ConfigArgumentMerger
ServerArgs.add_cli_args(argparse.ArgumentParser())" >/dev/null 2>&1
}
if [[ -x "$venv/bin/python" ]] && check; then
    echo "$which parser venv ready: $venv"
    exit 0
fi
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
if [[ "$which" == upstream ]]; then
    "${pip[@]}" --no-deps "$(bash scripts/fetch-upstream-sglang.sh)"
else
    "${pip[@]}" --no-deps "sglang-kt==0.7.2"
    # The fork's config classes import transformers at parser import time (the release its
    # transformers-kt 5.6.0.post6 pin is built on; the -kt kernels are not needed to parse).
    "${pip[@]}" "transformers==5.6.0"
fi
# Both pin a CUDA torch; the parser only needs a torch to import.
"${pip[@]}" torch==2.13.0
# What the import chain of srt/server_args.py and the --config merger asks for.
"${pip[@]}" numpy orjson psutil pybase64 requests triton packaging pillow starlette msgspec pydantic \
    pyzmq tqdm IPython aiohttp pyyaml
check || { echo "$which parser venv $venv cannot build sglang's parser:" >&2; "$venv/bin/python" -W ignore -c \
    "from sglang.srt.server_args import ServerArgs; import $merger" 2>&1 | tail -3 >&2; exit 1; }
echo "$which parser venv ready: $venv"
