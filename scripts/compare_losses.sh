#!/usr/bin/env bash
# Hard vs soft (vs mix) labels, everything else equal: one short run each, then tau on the target's own greedy
# continuations (held-out prompts, and HumanEval), printed side by side.
# Usage: bash scripts/compare_losses.sh RECIPE STEPS [LOSSES] [extra --key value ...]
#   bash scripts/compare_losses.sh recipes/qwen2.5-coder-1.5b.yaml 600 "hard soft"
# Runs are resumable (runs/cmp-<recipe>-<loss>): rerunning continues where a killed one stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=$1; STEPS=$2; LOSSES=${3:-"hard soft"}; shift $(( $# < 3 ? $# : 3 ))
NAME=$(basename "$RECIPE" .yaml)
ACC=${ACC:-"accelerate launch --config_file recipes/accelerate/single-gpu.yaml"}
TARGET=$(python -c "import yaml,sys; print(yaml.safe_load(open('$RECIPE'))['target'])")
for loss in $LOSSES; do
  $ACC train/distill.py --config "$RECIPE" --loss "$loss" --max_steps "$STEPS" --stage2_start_step null \
    --warmup_steps $(( STEPS / 20 + 1 )) --eval_every 0 --checkpoint_every 200 --eval_gen_prompts 64 \
    --output_dir "runs/cmp-$NAME-$loss" "$@"
  python scripts/eval_heads.py --target "$TARGET" --heads "runs/cmp-$NAME-$loss" --prompts humaneval \
    --num-prompts 48 --max-new-tokens 192 --json "runs/cmp-$NAME-$loss/humaneval.json" | tail -1 > /dev/null
done
python - "$NAME" $LOSSES <<'PY'
import json, sys
name, losses = sys.argv[1], sys.argv[2:]
keys = ["data/acc_head0", "data/acc_head3", "data/chain/tau", "generated/chain/tau", "generated/tree/tau", "generated/tree/tau_walk"]
print(f"{'loss':6s} " + " ".join(f"{k:>24s}" for k in keys) + f" {'humaneval chain':>16s} {'humaneval tree':>15s}")
for loss in losses:
    m = json.load(open(f"runs/cmp-{name}-{loss}/eval.json"))["metrics"]
    h = json.load(open(f"runs/cmp-{name}-{loss}/humaneval.json"))
    print(f"{loss:6s} " + " ".join(f"{m.get(k, float('nan')):24.3f}" for k in keys)
          + f" {h['generated/chain/tau']:16.3f} {h['generated/tree/tau']:15.3f}")
PY
