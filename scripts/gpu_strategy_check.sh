#!/usr/bin/env bash
# The training strategies on one CUDA GPU (the launch configs users run, NCCL, bf16): FSDP2, DeepSpeed ZeRO-2 and
# ZeRO-3 against the single-GPU run from the same seed, and checkpoints resumed across FSDP2 <-> ZeRO-3.
# One process each (the 2-process comparisons run on CPU in tests/, on GPUs in scripts/scale_out.sh).
# Usage: bash scripts/gpu_strategy_check.sh [OUT_DIR]   (needs deepspeed; about 4 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-strategy-check}
rm -rf "$OUT" && mkdir -p "$OUT"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 MLP_SPECULATORS_CACHE=off PYTHONUNBUFFERED=1
S=(train/distill.py --config recipes/smoke-cpu.yaml --loss hard --max_steps 12 --stage2_start_step 7 --checkpoint_every 4
   --eval_every 0 --log_every 1 --progress_bar false)
declare -A CFG=([single]="recipes/accelerate/single-gpu.yaml" [fsdp2]="recipes/accelerate/fsdp2.yaml"
                [zero2]="recipes/accelerate/deepspeed-zero2.yaml" [zero3]="recipes/accelerate/deepspeed-zero3.yaml")
run() {  # NAME STRATEGY [ARGS...]
  local name=$1 strategy=$2; shift 2
  accelerate launch --config_file "${CFG[$strategy]}" --num_processes 1 "${S[@]}" --output_dir "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name ($strategy): exit $? $(grep -E '^\[setup\] 1 process|^\[resume\] step' "$OUT/$name.log" | tr '\n' ' ')"
}
run single single
for s in fsdp2 zero2 zero3; do run "$s" "$s"; done
SPECULATORS_TEST_EXIT_AFTER_STEP=8 run fsdp2-to-zero3 fsdp2
run fsdp2-to-zero3 zero3 --resume auto
SPECULATORS_TEST_EXIT_AFTER_STEP=8 run zero3-to-fsdp2 zero3
run zero3-to-fsdp2 fsdp2 --resume auto
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(name):
    path = out / name / "train_log.jsonl"
    return {json.loads(l)["step"]: json.loads(l)["loss"] for l in path.read_text().splitlines() if l} if path.is_file() else {}
ref = losses("single")
ok = bool(ref)
for name in ("fsdp2", "zero2", "zero3", "fsdp2-to-zero3", "zero3-to-fsdp2"):
    got = losses(name)
    worst = max((abs(got[s] - ref[s]) / ref[s] for s in ref if s in got), default=float("nan"))
    good = sorted(got) == sorted(ref) and worst < 0.02  # bf16
    ok &= good
    print(f"{name:15s} steps {len(got):2d}/{len(ref)}  max relative loss difference vs single {worst:.2e}  {'ok' if good else 'MISMATCH'}")
print("all match" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
PY
