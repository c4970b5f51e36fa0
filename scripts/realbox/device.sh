#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root of the device tool's copy of the tree, with
# .realbox/ (from scripts/realbox/build.sh) and optionally studies/ carried. Sets up the real
# server's Python (the bundle, on PYTHONPATH through the space's server.env), installs kttune
# from this tree into the machine's Python, writes the model (scripts/realbox/make_model.py),
# restores the JIT caches of an earlier run, runs each argument as one command line, then packs
# the study folder, the JIT caches and the machine's facts into $OUT.
# RB_SPACE=SPACE also writes $OUT/real-study.md (benchmarks/real_study.py) and hardware.json among
# the facts (machine.txt, the server's --help) that results.tar.xz brings back with studies/.
# Usage: bash scripts/realbox/device.sh 'kttune run --space search_spaces/realbox-qwen3moe.yaml --budget 4' ...
set -uo pipefail
ROOT=$PWD RB=$PWD/.realbox BUNDLE=/tmp/sgkt MODEL=/tmp/realbox CACHE=/tmp/rbcache
OUT=${OUT:-/tmp/realbox-out}
mkdir -p "$OUT" "$CACHE"
t0=$(date +%s)
stamp() { echo "[realbox +$(( $(date +%s) - t0 ))s] $*"; }

stamp "bundle"
[ -f $BUNDLE/.ok ] || { mkdir -p $BUNDLE && tar -C $BUNDLE -xJf "$RB/sgkt.tar.xz" && touch $BUNDLE/.ok; } || exit 1
stamp "kttune + its dependencies"
python3 -m pip install -q --no-index --no-deps --no-build-isolation "$RB"/wheels/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" || exit 1
if [ -f "$RB/caches.tar.xz" ] && [ ! -f $CACHE/.restored ]; then
    stamp "JIT caches of an earlier run"; tar -C $CACHE -xJf "$RB/caches.tar.xz" && touch $CACHE/.restored
fi
# Where flashinfer, Triton, tvm-ffi and inductor keep what they compile: one folder, carried back.
export FLASHINFER_WORKSPACE_BASE=$CACHE/flashinfer TRITON_CACHE_DIR=$CACHE/triton \
       TVM_FFI_CACHE_DIR=$CACHE/tvm-ffi TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
# flashinfer's JIT runs ninja and nvcc from the interpreter's folder
PATH=$(dirname "$(python3 -c 'import sys; print(sys.executable)')"):$PATH
export PATH
stamp "model"
python3 scripts/realbox/make_model.py --out $MODEL || exit 1
FACTS=/tmp/realbox-facts; mkdir -p $FACTS
{ nvidia-smi; lscpu; free -g; python3 -c 'import torch; print("torch", torch.__version__)'; } > $FACTS/machine.txt 2>&1
[ -f $FACTS/launch_server-help.txt ] || PYTHONPATH=$BUNDLE LD_LIBRARY_PATH=$BUNDLE/_ktlibs \
    python3 -m sglang.launch_server --help > $FACTS/launch_server-help.txt 2>&1

# Each command is stopped with SIGINT (kttune's Ctrl-C: the server torn down, the study kept) at
# DEADLINE_S seconds after this script started, so that packing still fits in the device call;
# a command written "@SECONDS command" is stopped after at most SECONDS.
DEADLINE_S=${DEADLINE_S:-540}
for cmd in "$@"; do
    left=$(( DEADLINE_S - ($(date +%s) - t0) ))
    if [[ $cmd =~ ^@([0-9]+)\ (.*)$ ]]; then    # "@SECONDS command": at most that long
        cmd=${BASH_REMATCH[2]}; (( BASH_REMATCH[1] < left )) && left=${BASH_REMATCH[1]}
    fi
    if (( left < 20 )); then stamp "no time left for: $cmd"; continue; fi
    stamp "$cmd (at most ${left}s)"
    read -r -a argv <<< "$cmd"
    timeout -k 30 -s INT "$left" "${argv[@]}"
    echo "[realbox] rc=$? for: $cmd"
done

if [ -n "${RB_SPACE:-}" ]; then
    stamp "the machine's hardware and the study's table (benchmarks/real_study.py)"
    python3 benchmarks/real_study.py --space "$RB_SPACE" --save-hardware $FACTS/hardware.json
    python3 benchmarks/real_study.py --space "$RB_SPACE" > "$OUT/real-study.md"
fi
stamp "packing"
# at most 8 files come back: the studies and the facts in one archive, the caches in another
tar -cf - studies -C /tmp realbox-facts 2>/dev/null | xz -3 -T0 > "$OUT/results.tar.xz"
(cd $CACHE && find . -name '*.lock' -delete; tar -cf - --exclude=.restored . | xz -3 -T0 > "$OUT/caches.tar.xz")
ls -la "$OUT"
stamp "done"
