#!/usr/bin/env bash
# The main job on a fresh machine: install, then a real (short) training run end to end:
# demo data -> tiny model -> cold-start SFT on oracle episodes -> GRPO on Ray (2 rollout workers,
# 1 env actor, the learner) -> summary table + a trajectory viewer page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-data/demo}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
WEFT=.venv/bin/weft
t0=$(date +%s)
$WEFT make-demo-data --out "$DATA" --videos 8 --seconds 30 --seed 0
$WEFT check-env --data "$DATA" --policy oracle --episodes 8 --check --config configs/demo.yaml | tail -c 300; echo
[ -f "$DATA/tiny/config.json" ] || $WEFT make-tiny-model --out "$DATA/tiny" --seed 0
[ -f "$DATA/tiny-sft/config.json" ] || $WEFT sft --model "$DATA/tiny" --data "$DATA" --config configs/demo.yaml --out "$DATA/tiny-sft"
$WEFT train --config configs/demo.yaml --model "$DATA/tiny-sft" --run-dir "$RUN" data.path="$DATA/tasks.jsonl" "$@"
$WEFT view "$RUN" --out "$RUN/view.html"
echo "demo finished in $(( $(date +%s) - t0 )) s: run dir $RUN, viewer page $RUN/view.html"
