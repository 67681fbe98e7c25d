"""GPU check of the foundation: target adapter and heads in bf16 on CUDA, at real model shapes.

Builds a random-weight target with Qwen2.5-Coder-1.5B's shape (no download needed), runs the adapter and
heads in bf16, compares against the same modules in float64 on the CPU (relative error), round-trips an
IBM-format save/load on the GPU, and times the pieces whose cost drives the design (target forward vs heads
with the full and a reduced draft vocabulary).

    python scripts/gpu_foundation_check.py
"""

from __future__ import annotations

import json
import platform
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from speculators import MLPSpeculator, MLPSpeculatorConfig, TargetAdapter, check_compatible
from speculators.tree import propose

QWEN_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def timed(fn, iters: int = 10) -> float:
    """Median milliseconds of fn() on CUDA, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    results = {}

    # Small target first: bf16 CUDA vs float64 CPU of the very same weights.
    small = Qwen2Config(**{**QWEN_1_5B, "num_hidden_layers": 2, "vocab_size": 4096})
    target = AutoModelForCausalLM.from_config(small).eval().requires_grad_(False)
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=4096, emb_dim=1536, n_predict=4, draft_vocab_size=1024))
    heads.set_draft_vocab(torch.randperm(4096)[:1024])
    check_compatible(heads.config, target)
    ids = torch.randint(0, 4096, (2, 64 + 5))
    ref_out = TargetAdapter(target.double())(ids[:, :68])
    ref_logits = heads.double()(ref_out.hidden_states[:, :64], ids[:, 1:])
    target_bf16 = target.to(dev, torch.bfloat16)
    heads_bf16 = heads.to(dev, torch.bfloat16)
    out = TargetAdapter(target_bf16)(ids[:, :68].to(dev))
    logits = heads_bf16(out.hidden_states[:, :64], ids[:, 1:].to(dev))
    results["adapter_hidden_rel_err_bf16"] = rel_err(out.hidden_states, ref_out.hidden_states)
    results["adapter_logits_rel_err_bf16"] = rel_err(out.logits, ref_out.logits)
    results["heads_logits_rel_err_bf16"] = rel_err(logits, ref_logits)
    with tempfile.TemporaryDirectory() as d:
        heads_bf16.save_pretrained(d)
        again = MLPSpeculator.from_pretrained(d, dtype=torch.bfloat16).to(dev)
        results["save_load_bf16_identical"] = bool(torch.equal(again(out.hidden_states[:, :64], ids[:, 1:].to(dev)), logits))
        results["config_json"] = json.load(open(f"{d}/config.json"))
    cand = propose(heads_bf16, out.hidden_states[:, -1], ids[:, 68].to(dev), [4, 3, 2, 2], 8)
    results["tree_tokens_shape"] = list(cand.tokens.shape)
    del target, target_bf16

    # Full-size target, random weights: what the adapter and heads cost at training shapes.
    big = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_1_5B), dtype=torch.bfloat16).to(dev).eval().requires_grad_(False)
    adapter = TargetAdapter(big)
    B, T = 8, 2048
    x = torch.randint(0, 151936, (B, T), device=dev)
    with torch.no_grad():
        ms = timed(lambda: adapter(x), iters=5)
    results["target_forward_ms_8x2048"] = ms
    results["target_forward_tokens_per_s"] = B * T / ms * 1e3
    for draft in (0, 32768):
        h = MLPSpeculator(MLPSpeculatorConfig(vocab_size=151936, emb_dim=1536, n_predict=4, draft_vocab_size=draft)).to(dev, torch.bfloat16)
        state = torch.randn(1, 1536, device=dev, dtype=torch.bfloat16)
        tok = torch.randint(0, 151936, (1,), device=dev)
        with torch.no_grad():
            results[f"draft{draft}_chain_propose_ms_bs1"] = timed(lambda: propose(h, state, tok, [1, 1, 1, 1], 1), iters=20)
            results[f"draft{draft}_tree4322_propose_ms_bs1"] = timed(lambda: propose(h, state, tok, [4, 3, 2, 2], 16), iters=20)
    results["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9

    ok = results["heads_logits_rel_err_bf16"] < 2e-2 and results["adapter_logits_rel_err_bf16"] < 2e-2 and results["save_load_bf16_identical"]
    for k, v in results.items():
        print(f"{k:40s} {v if not isinstance(v, float) else f'{v:.4g}'}")
    print("FOUNDATION GPU CHECK", "PASSED" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
