#!/usr/bin/env bash
# The test command: install (idempotent), then the whole suite on the CPU.
# GPU-marked tests skip themselves without CUDA. Extra args go to pytest. The 25 slowest
# tests and fixtures are listed last: the suite must stay under 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
exec .venv/bin/python -m pytest -q -ra --timeout=900 --durations=25 "$@"
