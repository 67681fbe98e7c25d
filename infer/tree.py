"""Candidate paths -> a tree of unique prefixes, its attention mask and positions, and the accepted path.

Node layout is static: node 0 is the root (the token the target chose last step, not yet in the cache);
node 1 + p * h + d is the prefix cand[p, : d + 1] of candidate path p (depth d + 1). Paths that share a
prefix point at the first path's node for it (`canon`); the duplicate nodes stay in the tensors (static shapes)
but nothing reads them. So a tree of n paths of h tokens always has N = 1 + n * h nodes.

Verification writes node j at cache slot seq_len + j and rotates it at position seq_len + depth(j); node j
attends to the sequence so far and to its ancestors. After sampling y[j] at every node, the accepted path
follows children whose token equals the parent's y (see `accept`); its nodes' K/V are then copied to slots
seq_len + 1 .. seq_len + a.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeShape:
    """A static tree shape: how the drafter proposes (top-k per head, candidates kept). () is plain decoding."""

    top_k: tuple[int, ...] = ()
    n_candidates: int = 1

    @property
    def depth(self) -> int:
        return len(self.top_k)

    @property
    def n_nodes(self) -> int:
        return 1 + self.n_candidates * self.depth

    @property
    def name(self) -> str:
        if not self.depth:
            return "plain"
        if self.n_candidates == 1:
            return f"chain{self.depth}"
        return f"tree{list(self.top_k)}x{self.n_candidates}"


@dataclass
class Tree:
    tokens: torch.Tensor  # [B, N] token of every node (node 0: root)
    depth: torch.Tensor  # [N] depth of every node (root 0)
    canon: torch.Tensor  # [B, n, h] node holding the prefix cand[p, : d + 1]
    mask: torch.Tensor  # [B, N, N] node i may attend to node j


def node_depths(n: int, h: int, device) -> torch.Tensor:
    """[1 + n * h]: 0 for the root, then d + 1 for node 1 + p * h + d."""
    return torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.arange(1, h + 1, device=device).repeat(n)])


def build_tree(root: torch.Tensor, cand: torch.Tensor | None) -> Tree:
    """root: [B]; cand: [B, n, h] candidate paths (None for plain decoding)."""
    B, device = root.size(0), root.device
    if cand is None or cand.size(2) == 0:
        return Tree(root.unsqueeze(1), torch.zeros(1, dtype=torch.long, device=device),
                    torch.zeros(B, 1, 0, dtype=torch.long, device=device),
                    torch.ones(B, 1, 1, dtype=torch.bool, device=device))
    _, n, h = cand.shape
    N = 1 + n * h
    # same[b, p, q, d]: paths p and q agree on their first d + 1 tokens
    same = (cand.unsqueeze(2) == cand.unsqueeze(1)).long().cumprod(3)  # [B, n, n, h]
    first = same.argmax(2)  # [B, n, h] first path with the prefix (argmax returns the first maximum)
    canon = 1 + first * h + torch.arange(h, device=device)  # [B, n, h]
    # Ancestors of node (p, d): the root and canon[p, :d + 1].
    hits = canon.unsqueeze(-1) == torch.arange(N, device=device)  # [B, n, h, N]
    anc = hits.long().cumsum(2) > 0
    anc[..., 0] = True
    root_row = (torch.arange(N, device=device) == 0).expand(B, 1, N)
    mask = torch.cat([root_row, anc.reshape(B, n * h, N)], dim=1)  # [B, N, N]
    tokens = torch.cat([root.unsqueeze(1), cand.reshape(B, n * h)], dim=1)
    return Tree(tokens, node_depths(n, h, device), canon, mask)


def cache_mask(tree_mask: torch.Tensor, seq_len: torch.Tensor, S: int) -> torch.Tensor:
    """[B, 1, N, S] bool over cache slots: the sequence so far (slots < seq_len) plus the node's ancestors,
    which sit at slots seq_len + j."""
    B, N, _ = tree_mask.shape
    s = torch.arange(S, device=seq_len.device)
    L = seq_len.unsqueeze(1)  # [B, 1]
    rel = s - L  # [B, S] node index of each slot
    in_tree = (rel >= 0) & (rel < N)
    cols = tree_mask.gather(2, rel.clamp(0, N - 1).unsqueeze(1).expand(B, N, S))  # [B, N, S]
    return ((s < L).unsqueeze(1) | (in_tree.unsqueeze(1) & cols)).unsqueeze(1)


def accept(tokens: torch.Tensor, canon: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk the tree (tokens [B, N], canon [B, n, h] of `build_tree`) with the target's samples y [B, N].

    From the root: if y at the current node equals a child's token, move to that child; else stop. Siblings are
    unique, so the walk is well defined; it is recursive rejection sampling with point-mass drafts, hence exact.
    Returns (a [B] accepted draft tokens, path [B, h + 1] node indices from the root; entries past a are filler).
    The emitted tokens are y[path[: a + 1]].
    """
    B, n, h = canon.shape
    if h == 0:
        zeros = torch.zeros(B, dtype=torch.long, device=y.device)
        return zeros, zeros.unsqueeze(1)
    parent = torch.cat([torch.zeros(B, n, 1, dtype=torch.long, device=y.device), canon[:, :, :-1]], dim=2)
    parent_y = y.gather(1, parent.reshape(B, n * h)).reshape(B, n, h)
    cand = tokens[:, 1:].reshape(B, n, h)
    matched = (cand == parent_y).long().cumprod(2).sum(2)  # [B, n] accepted prefix length of every path
    best = matched.argmax(1, keepdim=True)  # [B, 1]
    a = matched.gather(1, best).squeeze(1)
    nodes = canon.gather(1, best.unsqueeze(2).expand(B, 1, h)).squeeze(1)  # [B, h]
    path = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=y.device), nodes], dim=1)
    return a, path
