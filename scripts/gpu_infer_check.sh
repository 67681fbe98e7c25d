#!/usr/bin/env bash
# The inference runtime on CUDA, quickly; no checkpoint is needed (tiny float64 models, random weights at
# Qwen2.5-1.5B's shape), so nothing but the repo has to travel to the GPU machine.
#   1. tiny Llama / Qwen2 / GPT-2 targets, float64 on CUDA with torch.compile + CUDA graphs: greedy output identical
#      to transformers' generate for plain / heads (random, fitted) / draft model (self, perturbed), ragged batches
#      and continuous batching; the HF fallback; sampling (top-k/top-p) exact against float64 probabilities and the
#      same tokens per seed for plain, draft chain and heads tree
#   2. tests/test_infer_gpu.py at the 1.5B shape, bf16: our model vs transformers' logits (fp32 and bf16), CUDA
#      graphs on vs off token-identical (same compiled kernels) for plain / heads / draft model (and eager, reported),
#      speculative vs plain agreement in bf16, tok/s of each method
# Usage: bash scripts/gpu_infer_check.sh [OUT_DIR]        (about 4-6 minutes on an H100, most of it compilation)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-infer-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
ROOT=$PWD
# speculators.infer is the checkout's infer/ (pyproject's package-dir): install the checkout (offline, no deps),
# or else lay out the package with symbolic links and run from outside the checkout.
if ! python3 -c "import speculators.infer" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
if ! python3 -c "import speculators.infer" 2>/dev/null; then
  PKG=/tmp/speculators-pkg/speculators
  rm -rf /tmp/speculators-pkg && mkdir -p "$PKG"
  for f in speculators/*; do ln -s "$ROOT/$f" "$PKG/"; done
  ln -s "$ROOT/infer" "$PKG/infer" && ln -s "$ROOT/train" "$PKG/train"
  export PYTHONPATH=/tmp/speculators-pkg${PYTHONPATH:+:$PYTHONPATH}
  cd /tmp
fi
python3 -c "import speculators.infer" || { echo "cannot import speculators.infer"; exit 1; }
python3 - <<'PY'
import torch, transformers  # noqa
print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
declare -A STATUS

echo "== 1. tiny targets, float64 on CUDA, compiled + CUDA graphs: exact greedy and sampling"
SPECULATORS_TEST_DEVICE=cuda timeout 420 python3 -m pytest "$ROOT/tests/test_infer_greedy.py" "$ROOT/tests/test_infer_sampling.py" \
  -q -x -p no:cacheprovider --durations=5 -k "ragged or hf or single or top_k_top_p or seeds" 2>&1 | tee "$OUT/tiny.log" | tail -15
STATUS[1]=${PIPESTATUS[0]}

echo "== 2. Qwen2.5-1.5B shape, random weights: logits vs transformers, graphs on/off, methods"
timeout 480 python3 -m pytest "$ROOT/tests/test_infer_gpu.py" -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu.log" \
  | grep -v -E "^\s*$|Loading weights|Writing model" | tail -45
STATUS[2]=${PIPESTATUS[0]}

echo "== summary (0 = passed; logs in $OUT)"
for k in 1 2; do echo "stage $k: exit ${STATUS[$k]}"; done
