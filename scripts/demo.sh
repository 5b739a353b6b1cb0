#!/usr/bin/env bash
# The main job on a fresh machine: install, then a real (short) training run end to end, and a
# held-out evaluation that shows whether RL taught the model to use the tools:
# flash task data (env/flash.py) -> tiny model -> perception pretraining (it learns to see colours, as the
# pretrained VLM it stands in for already can) -> cold-start SFT on scripted episodes -> GRPO on Ray
# (2 rollout workers, 1 env actor, the learner) -> `weft eval` of the SFT and the RL model on held-out
# videos, with tools and without (same frame budget), beside the oracle and blind policies.
# SEED=1 bash scripts/demo.sh is the second run of the README's table (another tiny model and sampling).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-data/demo}
SEED=${SEED:-0}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
FAMILY=${FAMILY:-qwen2_5_vl}  # the tiny model's family: qwen2_5_vl or qwen3_vl (models/adapters.py)
TINY=$DATA/tiny$([ "$FAMILY" = qwen2_5_vl ] || echo "-$FAMILY")-s$SEED
WEFT=.venv/bin/weft
CFG=configs/demo.yaml
t0=$(date +%s)
# Three sets of different videos: the RL tasks; the cold-start set the SFT plays (as VideoZoomer and
# VideoThinker keep their SFT data apart from their RL data); the held-out set nothing trains on.
[ -f "$DATA/tasks.jsonl" ] || $WEFT make-demo-data --out "$DATA" --videos 32 --seconds 30 --seed 13
[ -f "$DATA/coldstart/tasks.jsonl" ] || $WEFT make-demo-data --out "$DATA/coldstart" --videos 64 --seconds 30 --seed 7
[ -f "$DATA/heldout/tasks.jsonl" ] || $WEFT make-demo-data --out "$DATA/heldout" --videos 16 --seconds 30 --seed 21
$WEFT check-env --data "$DATA" --policy oracle --episodes 8 --check --config $CFG | tail -c 300; echo
[ -f "$TINY/config.json" ] || $WEFT make-tiny-model --out "$TINY" --seed "$SEED" --family "$FAMILY"
[ -f "$TINY-see/config.json" ] || $WEFT pretrain-vision --model "$TINY" --out "$TINY-see" --config $CFG seed="$SEED" | tail -1
[ -f "$TINY-sft/config.json" ] || $WEFT sft --model "$TINY-see" --data "$DATA/coldstart" --config $CFG --out "$TINY-sft" seed="$SEED"
$WEFT train --config $CFG --model "$TINY-sft" --run-dir "$RUN" data.path="$DATA/tasks.jsonl" \
  data.val_path="$DATA/heldout/tasks.jsonl" seed="$SEED" "$@"
$WEFT view "$RUN" --out "$RUN/view.html"
# Held-out: no-tools runs see env.overview_frames + env.max_frames = 12 uniform frames, the frames an
# episode with tools may see. Greedy (eval.temperature 0), one episode a task.
H=$RUN/heldout
ev() { $WEFT eval --data "$DATA/heldout" --config $CFG --out "$H/$1" "${@:2}" > "$H-$1.log" 2>&1 || { tail -20 "$H-$1.log"; exit 1; }; }
mkdir -p "$H"
ev oracle --policy oracle
ev blind --policy blind --samples 4  # 4 guesses a task: chance, measured
ev sft --model "$TINY-sft"
ev sft-no-tools --model "$TINY-sft" --no-tools --frames 12
ev rl --model "$RUN/model"
ev rl-no-tools --model "$RUN/model" --no-tools --frames 12
.venv/bin/python scripts/heldout_table.py "$H"
echo "demo finished in $(( $(date +%s) - t0 )) s: run dir $RUN, viewer page $RUN/view.html, held-out results $H"
