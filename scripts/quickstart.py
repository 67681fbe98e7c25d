"""Quickstart on the embedded default target, SmolLM2-135M-Instruct (shipped on PyPI, no Hub needed).

Prepares the model, builds MLP speculator heads for it, runs the target and the heads on a chat prompt
through the target adapter, and prints what each head proposes next to what the target chose.

    python scripts/quickstart.py [--heads DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from speculators import MLPSpeculator, MLPSpeculatorConfig, TargetAdapter, check_compatible, load_target
from speculators.offline_models import prepare_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "smollm2-135m"), help="where the prepared target goes")
    parser.add_argument("--heads", help="trained heads (a directory); default: freshly initialised heads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    target_dir = prepare_model("smollm2-135m", args.model_dir)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    target = load_target(str(target_dir), dtype=dtype, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if args.heads:
        heads = MLPSpeculator.from_pretrained(args.heads, dtype=dtype)
    else:
        torch.manual_seed(0)
        heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=target.config.vocab_size, emb_dim=target.config.hidden_size, n_predict=4))
    heads = heads.to(args.device, dtype).eval()
    check_compatible(heads.config, target)

    messages = [{"role": "user", "content": "Write a haiku about speculative decoding."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
    with torch.no_grad():
        reply = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
        adapter = TargetAdapter(target)
        out = adapter(reply)
        n = heads.config.n_predict
        T = reply.shape[1] - n - 1
        logits = heads(out.hidden_states[:, :T], reply[:, 1 : T + n + 1])  # [n, 1, T, V]
    guesses = logits.argmax(-1)
    start = prompt.shape[1] - 1
    print(f"target: {target_dir} ({target.config.num_hidden_layers} layers, hidden {target.config.hidden_size}, "
          f"vocab {target.config.vocab_size}) on {args.device}")
    print(f"reply:  {tokenizer.decode(reply[0, prompt.shape[1]:])!r}")
    print(f"heads:  {'trained, ' + args.heads if args.heads else 'untrained (random init)'}; n_predict={n}")
    for i in range(n):
        # Head i at position t proposes token t + i + 2; compare with what the target generated there.
        hits = (guesses[i, 0, start:T] == reply[0, start + i + 2 : T + i + 2]).float()
        print(f"  head {i}: top-1 agrees with the target on {hits.mean().item():.0%} of {hits.numel()} reply positions")


if __name__ == "__main__":
    main()
