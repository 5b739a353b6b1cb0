#!/usr/bin/env bash
# The main job on a fresh machine: install, then a real (short) training run end to end:
# demo data -> tiny model -> cold-start SFT on oracle episodes -> GRPO on Ray (2 rollout workers,
# 1 env actor, the learner; validation on a held-out set every 10 steps) -> summary tables + a
# trajectory viewer page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-data/demo}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
FAMILY=${FAMILY:-qwen2_5_vl}  # the tiny model's family: qwen2_5_vl or qwen3_vl (models/adapters.py)
TINY=$DATA/tiny$([ "$FAMILY" = qwen2_5_vl ] || echo "-$FAMILY")
WEFT=.venv/bin/weft
t0=$(date +%s)
# The RL tasks, and a separate cold-start set for the SFT (as VideoZoomer and VideoThinker keep
# their SFT data apart from their RL data): the SFT teaches the action format and tool use, and
# leaves the RL tasks' answers for GRPO to find.
$WEFT make-demo-data --out "$DATA" --videos 8 --seconds 30 --seed 13
$WEFT make-demo-data --out "$DATA/coldstart" --videos 8 --seconds 12 --seed 7
$WEFT make-demo-data --out "$DATA/val" --videos 8 --seconds 30 --seed 21  # held out: validation during training
$WEFT check-env --data "$DATA" --policy oracle --episodes 8 --check --config configs/demo.yaml | tail -c 300; echo
[ -f "$TINY/config.json" ] || $WEFT make-tiny-model --out "$TINY" --seed 0 --family "$FAMILY"
[ -f "$TINY-sft/config.json" ] || $WEFT sft --model "$TINY" --data "$DATA/coldstart" --config configs/demo.yaml --out "$TINY-sft"
$WEFT train --config configs/demo.yaml --model "$TINY-sft" --run-dir "$RUN" data.path="$DATA/tasks.jsonl" \
  data.val_path="$DATA/val/tasks.jsonl" "$@"
$WEFT view "$RUN" --out "$RUN/view.html"
echo "demo finished in $(( $(date +%s) - t0 )) s: run dir $RUN, viewer page $RUN/view.html"
