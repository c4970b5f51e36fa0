#!/usr/bin/env bash
# Builds, on a machine with PyPI, what the GPU machine (Python 3.12, torch 2.11 + CUDA 13, no
# network) needs to run a real SGLang + kt-kernel server under kttune, into the git-ignored
# folder .realbox/ (one carry, < 64 MiB):
#   .realbox/sgkt.tar.xz  upstream sglang 0.5.11 (pins torch 2.11.0) + sglang-kernel 0.4.2 (its
#                         sm90 ops only) + flashinfer 0.6.8.post1 (with data/: the sources its JIT
#                         compiles) + kt-kernel 0.5.0.post1 (the AMX and AVX-512 variants) + the
#                         pure-Python pieces the GPU machine's image lacks
#   .realbox/wheels/      what the image lacks for kttune (optuna, sqlalchemy, ...) and for
#                         sglang 0.5.11's bench_serving (HF datasets, imported by its MMMU loader)
# Why these pins, and what each carried package works around: docs/real-server.md.
# Usage: bash scripts/realbox/build.sh        (idempotent: a finished part is not rebuilt)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=.realbox
mkdir -p "$OUT/wheels"
PLAT=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp)
for t in manylinux_2_35 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    PLAT+=(--platform "${t}_x86_64")
done
PLAT+=(--platform any)

if [[ ! -s $OUT/wheels/.done ]]; then
    echo "== kttune's dependencies missing from the GPU machine's image"
    python3 -m pip download -q "${PLAT[@]}" -d "$OUT/wheels" \
        optuna==5.1.0 sqlalchemy==2.1.9 alembic==1.20.1 colorlog==6.12.0 mako==1.4.3 greenlet \
        datasets==4.4.1 multiprocess==0.70.18
    date -u +%FT%TZ > "$OUT/wheels/.done"
fi

if [[ ! -s $OUT/sgkt.tar.xz ]]; then
    echo "== the server bundle (downloads ~550 MB of wheels, keeps ~100 MB unpacked)"
    W=$(mktemp -d); S=$W/site; mkdir -p "$S"
    trap 'rm -rf "$W"' EXIT
    python3 -m pip download -q "${PLAT[@]}" -d "$W/w" \
        sglang==0.5.11 sglang-kernel==0.4.2 flashinfer-python==0.6.8.post1 apache-tvm-ffi==0.1.9 kt-kernel==0.5.0.post1 \
        fastapi==0.115.12 starlette==0.46.2 transformers==5.6.0 tokenizers==0.22.2 uvicorn==0.55.0 pydantic==2.14.4 \
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 python-multipart==0.0.34 orjson==3.13.0 \
        pyzmq==27.3.0 msgspec==0.23.0 pybase64==1.5.1 setproctitle==1.3.8 dill==0.4.1 openai==2.6.1 jiter==0.19.0 \
        distro==1.9.0 sniffio==1.3.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
        rpds-py==2026.9.1 partial-json-parser==0.2.1.1.post7 gguf==0.19.0 compressed-tensors==0.20.1 loguru==0.8.0 \
        soundfile==0.13.1 cffi==2.1.1 pycparser==3.12
    # kt-kernel 0.5.0.post1's extension needs libnuma/libhwloc/libgomp; 0.6.1's wheel vendors them
    python3 -m pip download -q "${PLAT[@]}" -d "$W/k61" kt-kernel==0.6.1
    rm -f "$W"/w/soundfile-*none-any.whl
    python3 scripts/realbox/unpack_wheels.py "$W/w" "$W/k61" "$S"
    tar -C "$S" -cf - . | xz -6 -T0 > "$OUT/sgkt.tar.xz.part" && mv "$OUT/sgkt.tar.xz.part" "$OUT/sgkt.tar.xz"
fi
ls -la "$OUT" "$OUT/wheels"
du -sh "$OUT"
