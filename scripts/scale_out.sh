#!/usr/bin/env bash
# Training on several GPUs of one host (docs/BENCHMARKS.md, "Scale-out"): the Qwen2.5-Coder-1.5B recipe on 1 GPU
# and under DDP / FSDP2 / DeepSpeed ZeRO-3 on N GPUs from the same seed, checkpoints resumed across strategies,
# then a random-weight Llama-70B-shape target sharded across the GPUs under FSDP2 and ZeRO-3.
#
#   bash scripts/scale_out.sh prepare [GGUF]       # HF checkpoint of Qwen2.5-Coder-1.5B (scripts/real_run_qwen.sh)
#   bash scripts/scale_out.sh qwen STRATEGY        # single (1 GPU), ddp, fsdp2 or zero3 (N GPUs)
#   bash scripts/scale_out.sh resume FROM TO       # FROM's step-RESUME_AT checkpoint, resumed under TO
#   bash scripts/scale_out.sh big fsdp2|zero3      # recipes/llama-70b-shape-random.yaml on N GPUs
#   bash scripts/scale_out.sh report               # tables, JSON and plot (scripts/scale_out_report.py)
#   setsid nohup bash scripts/scale_out.sh all [GGUF] > LOG 2>&1 &   # PHASES="qwen ddp,report" picks steps
#
# N (GPUs, default 2), STEPS (Qwen steps, default 60), RESUME_AT (default 30), MODEL (a directory, or `random`: random
# weights at the same shape, no checkpoint needed), RUNS and RESULTS can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2}
STEPS=${STEPS:-60}
RESUME_AT=${RESUME_AT:-30}
MODEL=${MODEL:-/root/models/qwen2.5-coder-1.5b}
RUNS=${RUNS:-/root/runs/scale-out}
# Not $OUT: the GPU machine sets it per call and empties it, and `all` outlives the call that starts it.
RESULTS=${RESULTS:-/tmp/scale-out}
mkdir -p "$RUNS" "$RESULTS"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Stage 1 only, no eval during the run, the same seed and data (3000 ShareGPT records) for every strategy; the heads'
# state path eager under every strategy (torch.compile under ZeRO-3's partitioned parameters is untried).
QWEN_ARGS=(--config recipes/qwen2.5-coder-1.5b.yaml --max_steps "$STEPS" --stage2_start_step null --compile false
  --warmup_steps 10 --eval_every 0 --eval_batches 2 --eval_gen_prompts 0 --checkpoint_every "$RESUME_AT" --keep_checkpoints 3
  --log_every 5 --max_records 3000 --num_proc 12 --seed 0 --progress_bar false)
if [ "$MODEL" = random ]; then  # no checkpoint at hand: random weights at Qwen2.5-1.5B's shape, byte tokenizer
  QWEN_ARGS+=(--target random:qwen2 --tokenizer bytes --target_config "{vocab_size: 151936, hidden_size: 1536,
    intermediate_size: 8960, num_hidden_layers: 28, num_attention_heads: 12, num_key_value_heads: 2,
    max_position_embeddings: 4096, tie_word_embeddings: true}")
else
  QWEN_ARGS+=(--target "$MODEL")
fi
QUIET="it/s\]|s/it\]|^\s*$|Warning|warn\("

launcher() {  # accelerate launch arguments of a strategy
  case "$1" in
    single) echo "--config_file recipes/accelerate/single-gpu.yaml" ;;
    ddp) echo "--config_file recipes/accelerate/ddp.yaml --num_processes $N" ;;
    fsdp2) echo "--config_file recipes/accelerate/fsdp2.yaml --num_processes $N" ;;
    zero3) echo "--config_file recipes/accelerate/deepspeed-zero3.yaml --num_processes $N" ;;
    *) echo "unknown strategy $1" >&2; exit 2 ;;
  esac
}

train() {  # NAME STRATEGY ARGS...: one run, its log and train_log.jsonl copied to RESULTS
  local name=$1 strategy=$2; shift 2
  local env=(); [ "$strategy" = single ] && env=(CUDA_VISIBLE_DEVICES=0)
  local status=0
  env "${env[@]}" accelerate launch $(launcher "$strategy") train/distill.py "$@" --output_dir "$RUNS/$name" \
    > "$RESULTS/$name.log" 2>&1 || status=$?
  grep -v -E "$QUIET" "$RESULTS/$name.log" | grep -E "^\[|^step|Error|error" | tail -8
  cp "$RUNS/$name/train_log.jsonl" "$RESULTS/$name.jsonl" 2>/dev/null || true
  return $status
}

phase() {
  case "$1" in
    prepare) MODEL=$MODEL bash scripts/real_run_qwen.sh prepare ${2:+"$2"} ;;
    qwen) train "qwen-$2" "$2" "${QWEN_ARGS[@]}" --resume none ;;
    resume)
      local dir="$RUNS/resume-$2-$3"
      rm -rf "$dir"; mkdir -p "$dir/checkpoints"
      cp -r "$RUNS/qwen-$2/checkpoints/step_$(printf %08d "$RESUME_AT")" "$dir/checkpoints/"
      cp "$RUNS/qwen-$2/train_log.jsonl" "$dir/"  # resume cuts it back to the checkpoint's step
      train "resume-$2-$3" "$3" "${QWEN_ARGS[@]}" --resume auto ;;
    big) train "big-$2" "$2" --config recipes/llama-70b-shape-random.yaml --resume none ;;
    report) python3 scripts/scale_out_report.py "$RESULTS" --gpus "$N" --resume-at "$RESUME_AT" ;;
    *) sed -n 2,13p "$0"; exit 2 ;;
  esac
}

if [ "${1:-}" = all ]; then
  IFS=, read -r -a phases <<< "${PHASES:-prepare,qwen single,qwen ddp,qwen fsdp2,qwen zero3,big fsdp2,big zero3,resume fsdp2 ddp,report}"
  for p in "${phases[@]}"; do
    echo "[all] $p: start $(date -u +%H:%M:%S)"
    args=($p); [ "$p" = prepare ] && args+=(${2:+"$2"})
    if phase "${args[@]}"; then echo "[all] $p: ok $(date -u +%H:%M:%S)"; else echo "[all] $p: FAILED ($?) $(date -u +%H:%M:%S)"; fi
  done
  echo "[all] done"
else
  phase "$@"
fi
