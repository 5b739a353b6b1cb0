#!/usr/bin/env bash
# One prepared GPU check: bench/gpu_check.py on a CUDA machine, from the repository root.
#   bash scripts/gpu_check.sh [--quick] OUT_DIR
# It installs only what the machine lacks, from the wheels scripts/gpu_wheels.sh put in .gpu_wheels/
# (never torch or triton: the machine's own are used), then writes OUT_DIR/gpu_check.md and
# gpu_check.json. --quick is the CPU dry run the test suite does (tiny shapes, nothing installed).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=""
if [[ "${1:-}" == "--quick" ]]; then QUICK="--quick"; shift; fi
OUT=${1:?usage: scripts/gpu_check.sh [--quick] OUT_DIR}
PY=${PYTHON:-python3}
if [[ -z "$QUICK" ]]; then
    missing=$("$PY" - <<'PYEOF'
import importlib.util
wanted = {"omegaconf": "omegaconf", "google.protobuf": "protobuf", "decord": "decord", "PIL": "pillow",
          "liger_kernel": "liger-kernel"}
def present(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
print(" ".join(pkg for mod, pkg in wanted.items() if not present(mod)))
PYEOF
)
    if [[ -n "$missing" ]]; then
        echo "[gpu_check] installing from .gpu_wheels: $missing"
        "$PY" -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels $missing
    fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" bench/gpu_check.py "$OUT" $QUICK
