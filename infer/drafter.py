"""Proposers: MLP speculator heads (a candidate tree) and draft models (a greedy chain).

Both return candidate paths [B, n, h] of target token ids for the rows of a batch, from what the engine keeps
per slot: the target's last hidden state, the root token (chosen by the target, not yet in the cache), the
token before it, and the number of tokens in the cache.
"""

from __future__ import annotations

import math

import torch

from speculators.tree import propose
from speculators.infer.tree import TreeShape


class MLPDrafter:
    """IBM-style MLP speculator heads (`speculators.MLPSpeculator`): `speculators.tree.propose` at a tree shape.

    Shapes offered to the adaptive rule: the heads' tree, the greedy chain of the same depth (far fewer
    nodes, which pays at large batch), and plain decoding.
    """

    def __init__(self, heads, top_k: list[int], n_candidates: int):
        self.heads = heads
        self.tree = TreeShape(tuple(top_k), n_candidates)
        self.depth = len(top_k)
        self.propose = propose  # replaced by a compiled function on CUDA

    def shapes(self) -> list[TreeShape]:
        chain = TreeShape((1,) * self.depth, 1)
        return list(dict.fromkeys([TreeShape(), chain, self.tree]))

    def setup(self, n_slots: int, max_len: int) -> None:
        pass

    def prefill(self, *args) -> None:
        pass

    def draft(self, shape: TreeShape, hidden, root, prev, seq_len, rows: slice, S: int) -> torch.Tensor:
        return self.propose(self.heads, hidden, root, list(shape.top_k), shape.n_candidates).tokens


class DraftModelDrafter:
    """A small causal LM (our Transformer or the HF fallback) with its own KV cache, drafting k greedy tokens.

    Its cache holds every committed position but possibly the last one (when all k drafts were accepted, the
    k-th draft was never fed), so each round first feeds [prev, root] at positions seq_len - 1 and seq_len:
    re-writing a position it already had costs nothing extra and keeps the shapes static.
    """

    def __init__(self, model, k: int):
        self.model = model
        self.depth = k

    def shapes(self) -> list[TreeShape]:
        return [TreeShape(), TreeShape((1,) * self.depth, 1)]

    def setup(self, n_slots: int, max_len: int) -> None:
        self.model.setup_cache(n_slots, max_len)

    def prefill(self, tokens, pos, slots, mask, rows: slice, S: int) -> None:
        self.model(tokens, pos, slots, mask, rows, S, logits=None)

    def draft(self, shape: TreeShape, hidden, root, prev, seq_len, rows: slice, S: int) -> torch.Tensor:
        s = torch.arange(S, device=root.device)
        pos = torch.stack([(seq_len - 1).clamp(min=0), seq_len], dim=1)  # [B, 2]
        tokens = torch.stack([prev, root], dim=1)
        out = []
        for i in range(shape.depth):
            mask = (s <= pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, S]
            _, logits = self.model(tokens, pos, pos, mask, rows, S, logits="last")
            tokens = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            out.append(tokens)
            pos = (seq_len + i + 1).unsqueeze(1)
        return torch.cat(out, dim=1).unsqueeze(1)  # [B, 1, k]


def tree_for_heads(config, num_speculative_tokens: int | None, top_k: list[int] | None, n_candidates: int | None):
    """(top_k per head, n_candidates) from the heads' config, overridden by the speculative_config keys."""
    k = num_speculative_tokens or config.n_predict
    if not 1 <= k <= config.n_predict:
        raise ValueError(f"num_speculative_tokens must be in 1..{config.n_predict} (the heads' n_predict), got {k}")
    top_k = list(top_k) if top_k is not None else list(config.top_k_tokens_per_head[:k])
    if len(top_k) != k or any(not isinstance(t, int) or t < 1 for t in top_k):
        raise ValueError(f"top_k_tokens_per_head needs {k} entries >= 1 (one per speculative token), got {top_k}")
    n_leaves = math.prod(top_k)
    n = n_candidates if n_candidates is not None else min(config.n_candidates, n_leaves)
    if not 1 <= n <= n_leaves:
        raise ValueError(f"n_candidates must be in 1..{n_leaves} (the leaves of a {top_k} tree), got {n}")
    return top_k, n
