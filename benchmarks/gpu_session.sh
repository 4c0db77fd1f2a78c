#!/usr/bin/env bash
# Issue 8, item 3 (the CUDA bf16 scoring path, measured), packed for a session that is lent a GPU.
#
# The device image has torch, transformers and numpy but not zstandard (the codec imports it), and it
# cannot download. So, here first (fetches that one wheel for the device's Python 3.12 into .whl/,
# which git ignores):
#     bash benchmarks/gpu_session.sh prepare
# then one device call, about 3 minutes of the 15 (machine start included):
#     run(command="bash benchmarks/gpu_session.sh run", carry=[".whl"], timeout_s=540)
# and copy the returned gpu_*.md / gpu_*.json into benchmarks/results/ (and the figures into the
# README's "Measured numbers"). Nothing here is needed for the tests or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    version="$(python3 -c 'import zstandard; print(zstandard.__version__)')"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      -d .whl "zstandard==$version"
    ;;
  run)
    : "${OUT:?run this on the device machine, where OUT names the folder that comes back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi -L
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 benchmarks/bench_gpu.py 2>&1 | tee "$OUT/gpu_log.txt"
    cp benchmarks/results/gpu_*.md benchmarks/results/gpu_*.json "$OUT"/
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh prepare|run   (see the comments at the top)" >&2
    exit 2
    ;;
esac
