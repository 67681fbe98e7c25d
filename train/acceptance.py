"""Acceptance simulator: how many tokens per target step the heads would give, without running a decoder.

For a sequence y the target has read (hidden[t] is its final-norm state after y[:t + 1]) and every position t:
the target's own token there is y[t + 1]; the heads propose candidates from (hidden[t], y[t + 1]) with
`speculators.tree.propose` (the runtime's own function); a candidate is accepted up to its first mismatch with
y[t + 2 :]; the tree accepts its best candidate. tau = 1 + mean accepted is the expected number of tokens per
target forward.

On the target's own greedy continuations this is exact for greedy decoding position by position; `tau_walk`
follows what a decoder actually visits (start at the prompt's end, jump by accepted + 1) and equals generated
tokens / target forwards. On held-out data y is the data, not the target's choice: a proxy.

    stats = evaluate_generated(target, heads, prompts, max_new_tokens=128)   # standalone, one process
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from speculators.tree import parse_tree_spec, propose


@dataclass
class Tree:
    """A candidate tree shape; the chain is top_k = [1] * n, n_candidates = 1."""

    name: str
    top_k: list[int]
    n_candidates: int


def trees_for(heads) -> list[Tree]:
    cfg = heads.config
    return [
        Tree("chain", [1] * cfg.n_predict, 1),
        Tree("tree", list(cfg.top_k_tokens_per_head), cfg.n_candidates),
    ]


@torch.no_grad()
def accepted_lengths(heads, hidden: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, tree: Tree, budget: int | None = None) -> torch.Tensor:
    """Tokens accepted at every position: [B, S] (-1 where invalid).

    hidden: [B, S, E]; ids: [B, >= S + 1 + n] token ids (y); valid: [B, S] positions to simulate (each needs
    y[t + 2 : t + 2 + n] to be real tokens).
    """
    n = len(tree.top_k)
    B, S, _ = hidden.shape
    out = torch.full((B, S), -1, dtype=torch.long, device=hidden.device)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return out
    windows = ids.unfold(1, n, 1)  # [B, L - n + 1, n]: windows[b, j] = y[j : j + n]
    spec = getattr(heads, "speculator", heads)
    width = 1
    for k in tree.top_k[:-1]:
        width *= k
    vocab = spec.draft_vocab_size or spec.vocab_size
    if budget is None:  # logits elements per proposal batch: wide trees need big batches to keep a GPU busy
        budget = 1 << 28 if hidden.is_cuda else 1 << 26
    chunk = max(1, budget // (max(width * tree.top_k[-1], 1) * vocab))
    for s in range(0, b_idx.numel(), chunk):
        b, t = b_idx[s : s + chunk], t_idx[s : s + chunk]
        cand = propose(heads, hidden[b, t], ids[b, t + 1], tree.top_k, tree.n_candidates).tokens  # [N, C, n]
        ref = windows[b, t + 2].unsqueeze(1)  # [N, 1, n]
        prefix = (cand == ref).long().cumprod(-1).sum(-1)  # [N, C]
        out[b, t] = prefix.max(-1).values
    return out


@dataclass
class AcceptanceStats:
    """Sums over positions (all-reducible across processes); `summary()` turns them into rates."""

    n_predict: int
    positions: torch.Tensor = None  # scalar
    accepted: torch.Tensor = None  # scalar, sum of accepted tokens
    at_least: torch.Tensor = None  # [n_predict]: positions that accepted >= i + 1 tokens
    walk_tokens: torch.Tensor = None  # scalar: tokens produced by the decoder walk (tau_walk numerator)
    walk_steps: torch.Tensor = None  # scalar

    def __post_init__(self):
        z = torch.zeros((), dtype=torch.float64)
        self.positions = self.positions if self.positions is not None else z.clone()
        self.accepted = self.accepted if self.accepted is not None else z.clone()
        self.at_least = self.at_least if self.at_least is not None else torch.zeros(self.n_predict, dtype=torch.float64)
        self.walk_tokens = self.walk_tokens if self.walk_tokens is not None else z.clone()
        self.walk_steps = self.walk_steps if self.walk_steps is not None else z.clone()

    def add(self, acc: torch.Tensor, starts: Sequence[int] | None = None) -> None:
        """acc: [B, S] accepted lengths (-1 invalid); starts: per row, where a decoder walk begins (None: no walk)."""
        acc = acc.cpu()
        v = acc >= 0
        self.positions += v.sum()
        self.accepted += acc.clamp(min=0).sum()
        for i in range(self.n_predict):
            self.at_least[i] += (acc >= i + 1).sum()
        if starts is not None:
            for row, t in zip(acc.tolist(), starts):
                while 0 <= t < len(row) and row[t] >= 0:
                    self.walk_tokens += row[t] + 1
                    self.walk_steps += 1
                    t += row[t] + 1

    def vector(self) -> torch.Tensor:
        return torch.cat([self.positions.view(1), self.accepted.view(1), self.at_least, self.walk_tokens.view(1), self.walk_steps.view(1)])

    @classmethod
    def from_vector(cls, n_predict: int, v: torch.Tensor) -> AcceptanceStats:
        v = v.double().cpu()
        return cls(n_predict, v[0], v[1], v[2 : 2 + n_predict], v[2 + n_predict], v[3 + n_predict])

    def summary(self, prefix: str) -> dict[str, float]:
        n = max(self.positions.item(), 1.0)
        out = {f"{prefix}/tau": 1.0 + self.accepted.item() / n, f"{prefix}/positions": self.positions.item()}
        prev = n
        for i in range(self.n_predict):
            k = self.at_least[i].item()
            out[f"{prefix}/accept_rate_head{i}"] = k / n  # P(accepted >= i + 1)
            out[f"{prefix}/accept_cond_head{i}"] = k / prev if prev else 0.0  # P(head i accepted | heads < i accepted)
            prev = k
        if self.walk_steps.item() > 0:
            out[f"{prefix}/tau_walk"] = self.walk_tokens.item() / self.walk_steps.item()
        return out


@dataclass
class Simulation:
    """Acceptance stats of every tree shape over a set of sequences."""

    trees: list[Tree]
    n_predict: int
    stats: dict[str, AcceptanceStats] = field(default_factory=dict)

    def __post_init__(self):
        self.stats = {t.name: AcceptanceStats(self.n_predict) for t in self.trees}

    def add(self, heads, hidden, ids, valid, starts=None) -> None:
        for tree in self.trees:
            self.stats[tree.name].add(accepted_lengths(heads, hidden, ids, valid, tree), starts)

    def vector(self) -> torch.Tensor:
        return torch.cat([self.stats[t.name].vector() for t in self.trees])

    def load_vector(self, v: torch.Tensor) -> None:
        size = self.n_predict + 4
        for j, tree in enumerate(self.trees):
            self.stats[tree.name] = AcceptanceStats.from_vector(self.n_predict, v[j * size : (j + 1) * size])

    def summary(self, prefix: str) -> dict[str, float]:
        out = {}
        for tree in self.trees:
            out.update(self.stats[tree.name].summary(f"{prefix}/{tree.name}"))
        return out


def valid_positions(lengths: torch.Tensor, S: int, n: int, starts: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] mask of positions t with start <= t and t + n + 1 < length (the heads' whole reference is real)."""
    t = torch.arange(S, device=lengths.device).unsqueeze(0)
    mask = t + n + 1 < lengths.unsqueeze(1)
    if starts is not None:
        mask &= t >= starts.unsqueeze(1)
    return mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] right-padded ids and [B] lengths: with causal attention the real tokens never see the padding, so the
    states of a right-padded batch equal those of each sequence alone (left padding would shift positions)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def simulate_generated(heads, hidden_fn, prompts, continuations, pad_id: int, sim: Simulation, batch_size: int = 8) -> None:
    """Add the acceptance of `continuations` (the target's greedy output after each prompt) to `sim`.

    hidden_fn(ids [B, L]) -> [B, L, E] the target's final-norm states.
    """
    n = sim.n_predict
    for s in range(0, len(prompts), batch_size):
        ps, cs = prompts[s : s + batch_size], continuations[s : s + batch_size]
        ids, lengths = right_pad([list(p) + list(c) for p, c in zip(ps, cs)], pad_id)
        device = next(heads.parameters()).device
        ids, lengths = ids.to(device), lengths.to(device)
        hidden = hidden_fn(ids)
        starts = torch.tensor([len(p) - 1 for p in ps], device=device)
        valid = valid_positions(lengths, ids.size(1), n, starts)
        padded = torch.nn.functional.pad(ids, (0, n + 2), value=pad_id)
        sim.add(heads, hidden, padded, valid, starts=starts.tolist())


def parse_tree(spec: str, n_predict: int) -> Tree:
    """"8,5,3,2x16" -> the tree with top-k 8, 5, 3, 2 per head keeping 16 candidates (named tree[8,5,3,2]x16)."""
    top_k, n = parse_tree_spec(spec)
    if len(top_k) > n_predict:
        raise ValueError(f"tree {spec!r}: {len(top_k)} top-k entries for heads with n_predict = {n_predict}")
    return Tree(f"tree[{','.join(map(str, top_k))}]x{n}", top_k, n)


def evaluate_generated(target, heads, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128, batch_size: int = 8,
                       pad_id: int | None = None, eos_ids: Sequence[int] | None = None,
                       trees: Sequence[Tree] = ()) -> dict[str, float]:
    """Standalone (one process): the target continues every prompt greedily, then tau chain / tree (and any
    further `trees`) on those continuations. target: a plain transformers causal LM; heads: an MLPSpeculator on
    the same device."""
    from speculators.train.generate import greedy_continuations

    hidden_fn = HiddenStates(target)
    pad = pad_id if pad_id is not None else (target.config.pad_token_id or 0)
    conts = greedy_continuations(target, prompts, max_new_tokens, batch_size=batch_size, pad_id=pad, eos_ids=eos_ids)
    sim = Simulation(trees_for(heads) + list(trees), heads.config.n_predict)
    simulate_generated(heads, hidden_fn, prompts, conts, pad, sim, batch_size=batch_size)
    out = sim.summary("generated")
    out["generated/tokens"] = float(sum(len(c) for c in conts))
    return out


class HiddenStates:
    """Final-norm hidden states of a plain causal LM (lm_head input), logits computed for one position only."""

    def __init__(self, model):
        from speculators.train.teacher import Teacher

        self.teacher = Teacher(model, model, None, need_soft=False, soft_teacher="logits")

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher(ids).hidden
