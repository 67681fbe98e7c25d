"""Choosing a reduced draft vocabulary: the N target tokens the heads will score.

Heads that score the whole vocabulary (128k-262k rows) read as many bytes per step as a large share of the
target; the most frequent N tokens of the training data cover nearly all of what the target emits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def count_tokens(rows: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Occurrences of every token id [vocab_size] over tensors of token ids."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in rows:
        counts += torch.bincount(torch.as_tensor(ids).reshape(-1).long(), minlength=vocab_size)[:vocab_size]
    return counts


def select_draft_vocab(counts: torch.Tensor, size: int, always_include: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids (ties by smaller id), plus `always_include` (e.g. EOS), sorted ascending."""
    if not 0 < size <= counts.numel():
        raise ValueError(f"draft vocabulary size must be in 1..{counts.numel()} (the target vocabulary), got {size}")
    forced = sorted({int(i) for i in always_include})
    if len(forced) > size:
        raise ValueError(f"{len(forced)} tokens must be included but the draft vocabulary holds only {size}")
    score = counts.double().clone()
    score[forced] = float("inf")
    # A stable sort on -score breaks ties by id, so the choice is deterministic.
    order = torch.sort(-score, stable=True).indices
    return torch.sort(order[:size]).values


def coverage(counts: torch.Tensor, draft_ids: torch.Tensor) -> float:
    """Fraction of all counted tokens that lie in the draft vocabulary."""
    total = counts.sum().item()
    return counts[draft_ids].sum().item() / total if total else 0.0
