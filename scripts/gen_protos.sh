#!/usr/bin/env bash
# Generate the gRPC stubs of protos/learner.proto into protos/learner_pb2{.py,.pyi,_grpc.py}
# (committed; tests/learner/test_wire.py regenerates into a temp dir and checks they match).
#   scripts/gen_protos.sh [OUT_ROOT]     files land in OUT_ROOT/protos/ (default: the repo root)
# PYTHON picks the interpreter (default: .venv/bin/python), which must have grpcio-tools.
#
# protoc runs with `-I .` on `protos/learner.proto`, so the stubs import each other as
# `from protos import learner_pb2` (a plain `-I protos` would emit a top-level
# `import learner_pb2`, which only works with protos/ itself on sys.path).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" protos/learner.proto
grep -q '^from protos import learner_pb2 as ' "$OUT/protos/learner_pb2_grpc.py" \
  || { echo "gen_protos: expected 'from protos import learner_pb2' in learner_pb2_grpc.py" >&2; exit 1; }
