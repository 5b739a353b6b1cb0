#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with the wheels scripts/gpu_check.sh installs on a bare CUDA machine
# (Python 3.12 with torch, triton, transformers, grpcio, msgpack and peft; no package index there).
# Run it here, where the index is reachable; the folder then travels with the working tree.
# Everything is --no-deps: the machine's own torch and triton must not be touched.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_wheels
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
# What the check imports that the bare machine lacks: omegaconf (configs), protobuf (the gRPC
# messages), decord (env), pillow (the tiny model's image processor), liger-kernel (row 2's
# baseline). Versions as requirements.txt pins them.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$DIR" \
    "omegaconf==2.4.*" "protobuf>=5,<8" "decord==0.6.0" "pillow>=10" "liger-kernel==0.8.5"
bytes=$(du -sb "$DIR" | cut -f1)
ls -l "$DIR"
echo "[gpu_wheels] $DIR: $((bytes / 1048576)) MiB"
if (( bytes > 60 * 1048576 )); then
    echo "[gpu_wheels] over the 60 MB the device machine accepts with a call" >&2
    exit 1
fi
