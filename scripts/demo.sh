#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the demo end to end.
# (Today: demo data generation + an oracle and a blind check-env run over it.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-data/demo}
.venv/bin/weft make-demo-data --out "$DATA" --videos 8 --seconds 60 --seed 0
.venv/bin/weft check-env --data "$DATA" --policy oracle --episodes 16 --check
.venv/bin/weft check-env --data "$DATA" --policy blind --episodes 16
