"""`Student`: the heads plus their loss, as one module that accelerate wraps (DDP, FSDP2, DeepSpeed) and trains.

The loss runs inside `forward` so that the wrappers' machinery applies to it: DDP's gradient hooks, FSDP2's
unsharding of the output layers' weights, which the fused loss reads directly.

Layout (IBM's fms-extras): a row ids [B, L] has L = T + n_predict + 1 tokens; the target ran on ids[:, :T + n]
(hidden [B, T + n, E]); head i at position t reads the running state and token ids[t + i + 1], and predicts
ids[t + i + 2] (hard label) or matches the target's distribution at position t + i + 1 (soft label).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from speculators import MLPSpeculator
from speculators.train.loss import IGNORE_INDEX, SoftTargets, fused_linear_loss

# Teacher logits over the draft vocabulary are computed once for all heads up to this many (2 GiB in bf16: a 32k
# draft vocabulary at 8 x 2048 tokens); beyond it, per head and chunk from the hidden states.
TEACHER_LOGITS_ELEMENTS = 1 << 30


class StudentOutput(NamedTuple):
    """A NamedTuple, not a dataclass: FSDP2 finds the output tensors to hook its backward (unshard, then
    reduce-scatter into the sharded gradients) by flattening the forward's output as a pytree, and a dataclass is one
    opaque leaf to torch 2.11's pytree: the heads then got no gradients at all under FSDP2 on GPUs."""

    loss: torch.Tensor  # scalar, sum over heads (IBM sums the heads' losses)
    head_loss: torch.Tensor  # [n_predict] detached
    head_correct: torch.Tensor  # [n_predict] top-1 hits on valid hard labels
    head_count: torch.Tensor  # [n_predict] valid hard labels


class Student(nn.Module):
    def __init__(self, heads: MLPSpeculator, loss: str, soft_weight: float, chunk_tokens: int = 0):
        super().__init__()
        self.heads = heads
        self.alpha = {"hard": 0.0, "soft": 1.0, "mix": soft_weight}[loss]
        self.chunk_tokens = chunk_tokens
        self.states_fn = heads.speculator.states  # replaced by a compiled version with `compile: true`

    def forward(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        soft_logits: torch.Tensor | None = None,
        soft_weight: torch.Tensor | None = None,
        soft_scale: float = 1.0,
    ) -> StudentOutput:
        """hidden: [B, >= T + n, E] target states; ids: [B, T + n + 1]; soft_logits: [B, >= T + n, V'] teacher logits,
        or soft_weight [V', E] to compute them from `hidden` per chunk (scaled by soft_scale)."""
        spec = self.heads.speculator
        n = spec.n_predict
        T = ids.size(1) - n - 1
        states = self.states_fn(hidden[:, :T], ids[:, 1 : T + n + 1])  # n x [B, T, D]
        rows = spec.target_to_draft(ids)  # draft ids; draft_vocab_size marks tokens outside the draft vocabulary
        if spec.draft_vocab_size:
            rows = torch.where(rows == spec.draft_vocab_size, IGNORE_INDEX, rows)
        use_soft = self.alpha > 0.0
        if use_soft and soft_logits is None and soft_weight is None:
            raise ValueError("soft labels need the teacher's logits or the draft rows of its lm_head")
        if use_soft and soft_logits is None and hidden.size(0) * (T + n) * soft_weight.size(0) <= TEACHER_LOGITS_ELEMENTS:
            # The heads read the teacher at overlapping positions (head i at t + i + 1): one matmul for all of them
            # instead of one per head and chunk, while the draft-vocabulary logits fit one GEMM block.
            soft_logits, soft_scale_logits = hidden[:, : T + n] @ soft_weight.t(), soft_scale
        else:
            soft_scale_logits = 1.0
        total = hidden.new_zeros((), dtype=torch.float32)
        losses, correct, count = [], [], []
        for i, state in enumerate(states):
            labels = rows[:, i + 2 : i + 2 + T]  # [B, T]
            soft = None
            if use_soft:
                if soft_logits is not None:
                    soft = SoftTargets(logits=soft_logits, scale=soft_scale_logits, offset=i + 1, T=T)
                else:
                    soft = SoftTargets(hidden=hidden, weight=soft_weight, scale=soft_scale, offset=i + 1, T=T)
            weight = spec.head[spec.module_index(i, "shared")].weight
            loss_i, correct_i = fused_linear_loss(
                state, weight, labels, soft, alpha=self.alpha,
                chunk_size=self.chunk_tokens,
            )
            total = total + loss_i
            losses.append(loss_i.detach())
            correct.append(correct_i)
            count.append(labels.ne(IGNORE_INDEX).sum())
        return StudentOutput(total, torch.stack(losses), torch.stack(correct), torch.stack(count))
