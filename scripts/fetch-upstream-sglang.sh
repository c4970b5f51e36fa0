#!/usr/bin/env bash
# Fetch the upstream sglang 0.5.23 wheel (~40 MB, --no-deps) into .cache/wheels/ (git-ignored)
# for the conformance tests, which read its source as text and never import it, and for
# scripts/upstream-venv.sh. Idempotent: prints the wheel's path and exits if it is there.
#
# usage: scripts/fetch-upstream-sglang.sh        env: PYTHON (default: python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="0.5.23"
dir=".cache/wheels"
found() { ls "$dir"/sglang-"$version"-*.whl 2>/dev/null | head -1; }
if [[ -z "$(found)" ]]; then
    mkdir -p "$dir"
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        -d "$dir" "sglang==$version"
fi
wheel="$(found)"
[[ -n "$wheel" ]] || { echo "no sglang $version wheel in $dir" >&2; exit 1; }
echo "$wheel"
