"""Candidate trees from the heads: IBM's `generate_suffixes`, with static shapes.

Starting from the target's last state and the token it just chose, head i expands every branch into its
top_k[i] tokens; the n_candidates root-to-leaf paths with the highest summed log-probability are kept.
Training's acceptance simulator and the runtime's drafting both call this, so they agree by construction.
All shapes depend only on (B, top_k, n_candidates): the function is CUDA-graph and compile friendly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Candidates:
    tokens: torch.Tensor  # [B, n_candidates, n_heads] target token ids, one path per row
    log_probs: torch.Tensor  # [B, n_candidates] summed head log-probabilities of each path (best first)
    head_log_probs: torch.Tensor  # [B, n_candidates, n_heads] each head's log-probability of its token


def propose(heads, state: torch.Tensor, token: torch.Tensor, top_k: list[int], n_candidates: int) -> Candidates:
    """Best `n_candidates` paths of the tree whose level i has top_k[i] children per node.

    heads: an `MLPSpeculator` (or its `.speculator`); state: [B, E] the target's final-norm hidden state at the
    last accepted position; token: [B] the target token chosen there. len(top_k) heads are used (at most
    n_predict). A chain is top_k = [1] * n, n_candidates = 1.
    """
    spec = getattr(heads, "speculator", heads)
    n_heads = len(top_k)
    if not 1 <= n_heads <= spec.n_predict:
        raise ValueError(f"top_k needs 1..n_predict = {spec.n_predict} entries (one per head used), got {top_k}")
    n_leaves = math.prod(top_k)
    if not 1 <= n_candidates <= n_leaves:
        raise ValueError(f"n_candidates must be in 1..{n_leaves} (the leaves of a {top_k} tree), got {n_candidates}")
    B = state.size(0)
    s = spec.prepare_state(state).unsqueeze(1)  # [B, 1, E]
    rows = spec.target_to_draft(token).unsqueeze(1)  # [B, 1] embedding rows of the chosen token
    paths = torch.empty(B, 1, 0, dtype=torch.long, device=state.device)  # [B, k, i] draft ids so far
    path_lp = torch.zeros(B, 1, n_heads, dtype=torch.float32, device=state.device)
    total = torch.zeros(B, 1, dtype=torch.float32, device=state.device)
    for i, k in enumerate(top_k):
        s = spec.step(i, s, rows)  # [B, w, D] with w = prod(top_k[:i])
        lp = torch.log_softmax(spec.logits(i, s).float(), dim=-1)
        lp_k, ids_k = lp.topk(k, dim=-1)  # [B, w, k]
        w = s.size(1)
        paths = torch.cat([paths.unsqueeze(2).expand(B, w, k, i), ids_k.unsqueeze(3)], dim=3).reshape(B, w * k, i + 1)
        path_lp = path_lp.unsqueeze(2).expand(B, w, k, n_heads).clone()
        path_lp[..., i] = lp_k
        path_lp = path_lp.reshape(B, w * k, n_heads)
        total = (total.unsqueeze(2) + lp_k).reshape(B, w * k)
        s = s.unsqueeze(2).expand(B, w, k, s.size(-1)).reshape(B, w * k, s.size(-1))
        rows = ids_k.reshape(B, w * k)  # a draft id is its own embedding row
    best_lp, best = total.topk(n_candidates, dim=1)  # sorted, best first
    tokens = paths.gather(1, best.unsqueeze(2).expand(B, n_candidates, n_heads))
    if spec.draft_to_target is not None:
        tokens = spec.draft_to_target[tokens]
    head_lp = path_lp.gather(1, best.unsqueeze(2).expand(B, n_candidates, n_heads))
    return Candidates(tokens=tokens, log_probs=best_lp, head_log_probs=head_lp)


def parse_tree_spec(spec: str) -> tuple[list[int], int]:
    """"8,5,3,2x16" -> ([8, 5, 3, 2], 16): top-k per head, candidates kept (command-line form of a tree shape)."""
    try:
        top_k, n = spec.strip().split("x")
        top_k, n = [int(k) for k in top_k.split(",")], int(n)
    except ValueError:
        raise ValueError(f"a tree is TOP_K,TOP_K,...xN_CANDIDATES (e.g. 8,5,3,2x16), got {spec!r}") from None
    if min(top_k) < 1 or not 1 <= n <= math.prod(top_k):
        raise ValueError(f"tree {spec!r}: top-k entries must be >= 1 and 1 <= candidates <= {math.prod(top_k)}")
    return top_k, n
