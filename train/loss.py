"""Chunked fused output layer + loss: a head's logits never exist in full, nothing is recomputed in backward.

A head's output layer maps N = B * T states to V (up to 262k) logits; in fp32 that is 4 * N * V bytes per head,
the largest tensor of the whole step by far. Like Liger's fused linear cross-entropy, `FusedLinearLoss` computes
the loss and the logits' gradient in forward and turns the latter straight into the gradients w.r.t. the states
and the weight; backward only scales them by the incoming gradient. Two granularities:
- a GEMM block (up to ~512M logits, 1 GiB in bf16: all 16k tokens of a 32k draft vocabulary) gets its logits
  from one matmul, in the compute dtype, and its gradients from two more, the logits' gradient written over
  the logits. Big blocks keep the GEMMs efficient and the fp32 weight gradient is accumulated once per block;
- the fp32 softmax / loss / gradient math: on CUDA a Triton kernel over the block's rows (train/loss_kernel.py,
  two passes per row, the teacher read in place); elsewhere, and for teachers made per chunk from hidden states,
  over chunks of a block (~32M logits) that bound the fp32 temporaries, compiled on CUDA.

Per token t with student logits z = x_t W^T and q = softmax(z) (fp32), the loss is

    l_t = (1 - alpha) * [y_t valid] * (logsumexp(z) - z[y_t]) / n_hard        (hard labels: cross-entropy)
        +      alpha  *  sum_v p_v * (log p_v - log q_v)       / n_soft        (soft labels: KL(p || q))

with p = softmax(teacher logits) over the same (draft) vocabulary, so a draft vocabulary renormalises the
teacher. n_hard counts valid labels, n_soft all tokens; dl/dz = (a + b) q - a onehot(y) - b p with a, b the
two per-token weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculators.train import loss_kernel

IGNORE_INDEX = -100


@dataclass
class SoftTargets:
    """The teacher's logits over the heads' vocabulary, produced one chunk of tokens at a time.

    Either `logits` (the target's own logits, already restricted to the draft vocabulary), or `hidden` with
    `weight` [V', E] (the draft rows of the target's lm_head) and `scale` (e.g. Granite's 1 / logits_scaling):
    then the teacher's logits are computed per chunk and never exist in full either.
    The source tensor is [N, X], or [B, S, X] read at positions offset .. offset + T of every row (head i reads
    the target at t + i + 1), so no shifted copy of the [B, S, V'] logits is made.
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scale: float = 1.0
    offset: int = 0
    T: int | None = None

    @property
    def source(self) -> torch.Tensor:
        src = self.logits if self.logits is not None else self.hidden
        return src if src.dim() == 3 else src.unsqueeze(0)

    def _rows(self, start: int, end: int) -> torch.Tensor:
        src, T = self.source, self.T or self.source.size(1)
        pieces = []
        while start < end:
            b, j = divmod(start, T)
            n = min(end - start, T - j)
            pieces.append(src[b, self.offset + j : self.offset + j + n])
            start += n
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def chunk(self, start: int, end: int) -> torch.Tensor:
        """Teacher logits [end - start, V'] for flat token indices start..end (the loss upcasts them to fp32)."""
        rows = self._rows(start, end)
        out = rows if self.logits is not None else rows.to(self.weight.dtype) @ self.weight.t()
        return out.float() * self.scale if self.scale != 1.0 else out

    def __len__(self) -> int:
        return self.source.size(0) * (self.T or self.source.size(1))


GEMM_BLOCK_ELEMENTS = 1 << 29  # logits per GEMM block: 1 GiB in bf16


def auto_chunk_size(vocab: int, budget_elements: int = 1 << 25) -> int:
    """Tokens per chunk so one fp32 [chunk, V] temporary stays near 128 MiB (a few live at once)."""
    return max(64, budget_elements // max(vocab, 1))


def auto_gemm_tokens(vocab: int, chunk_size: int) -> int:
    """Tokens per GEMM block: a whole number of chunks, logits near GEMM_BLOCK_ELEMENTS."""
    return chunk_size * max(1, GEMM_BLOCK_ELEMENTS // max(vocab, 1) // chunk_size)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype if the caller runs under autocast (heads in fp32, matmuls in bf16), else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def chunk_loss_and_grad(z, labels, hard_weight, teacher, soft_weight: float, grad_in_place: bool):
    """One chunk of tokens: (summed loss, top-1 hits), all in fp32 inside; with grad_in_place, dl/dz is written
    over z (in z's dtype), so that compiled it is stored by the same kernel that computes it.

    z [n, V] logits; labels [n] (IGNORE_INDEX allowed) or None; hard_weight [n] per-token CE weight (0 where the
    label is ignored) or None; teacher [n, V] teacher logits or None; soft_weight the KL weight per token.
    Plain tensor code, so torch.compile fuses it into a few passes over [n, V] (on CUDA it is compiled).
    """
    logits, z = z, z.float()
    logq = z - torch.logsumexp(z, dim=-1, keepdim=True)
    q = logq.exp()
    loss = z.new_zeros(())
    n_correct = None
    dz = q * soft_weight if teacher is not None else None
    if labels is not None:
        valid = labels.ne(IGNORE_INDEX)
        y = torch.where(valid, labels, 0)
        n_correct = (logq.argmax(-1).eq(y) & valid).sum()
        if hard_weight is not None:
            loss = loss - (logq.gather(1, y.unsqueeze(1)).squeeze(1) * hard_weight).sum()
            onehot = torch.arange(z.size(1), device=z.device).unsqueeze(0).eq(y.unsqueeze(1))
            hard = hard_weight.unsqueeze(1) * (q - onehot.float())
            dz = hard if dz is None else dz + hard
    if teacher is not None:
        logp = torch.log_softmax(teacher.float(), dim=-1)
        p = logp.exp()
        # p log p is 0 where p underflows to 0: xlogy keeps it finite.
        loss = loss + soft_weight * (torch.special.xlogy(p, p).sum() - (p * logq).sum())
        dz = dz - soft_weight * p
    if grad_in_place and dz is not None:
        logits.copy_(dz)
    return loss, n_correct


_COMPILED = None


def _compiled_chunk():
    """chunk_loss_and_grad under torch.compile (~10 fp32 passes over [n, V] become ~3), eager if it fails."""
    global _COMPILED
    if _COMPILED is None:
        import warnings

        import torch._dynamo

        # Shapes differ between full and last chunks, stage 1 and 2, training and eval: a few specialisations.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        compiled = torch.compile(chunk_loss_and_grad, dynamic=False)
        state = {"failed": False}

        def run(*args):
            if not state["failed"]:
                try:
                    return compiled(*args)
                except Exception as err:  # noqa: BLE001 - any compiler failure: the eager version is exact too
                    warnings.warn(f"torch.compile of the loss chunk failed ({type(err).__name__}: {err}); running it eagerly", stacklevel=2)
                    state["failed"] = True
            return chunk_loss_and_grad(*args)

        _COMPILED = run
    return _COMPILED


def _block_rows(chunk_fn, z, labels, hard, soft, row0, soft_weight, want_grad, chunk_size):
    """(summed loss, top-1 hits or None) of one GEMM block's rows z [m, V] (flat tokens row0 ..), with dl/dz written
    over z when want_grad: the Triton row kernel where it serves, else chunk by chunk (compiled on CUDA)."""
    if _kernel_serves(z, soft):
        t = dict(teacher=None) if soft is None else dict(teacher=soft.source, t_offset=soft.offset,
                                                         t_T=soft.T or soft.source.size(1), t_row0=row0, t_scale=soft.scale)
        out = _run_kernel(z, labels, hard, soft_weight, want_grad, t)
        if out is not None:
            return out
    loss, n_correct = 0.0, None
    for s in range(0, z.size(0), chunk_size):
        e = min(s + chunk_size, z.size(0))
        y = labels[s:e] if labels is not None else None
        teacher = soft.chunk(row0 + s, row0 + e) if soft is not None else None
        # This chunk's logits are spent once read: their gradient takes their place.
        part, correct = chunk_fn(z[s:e], y, hard[s:e] if hard is not None else None, teacher, soft_weight, want_grad)
        loss = loss + part
        if correct is not None:
            n_correct = correct if n_correct is None else n_correct + correct
    return loss, n_correct


_KERNEL = {"enabled": True}


def _run_kernel(z, labels, hard, soft_weight, write_grad, teacher_args):
    """(loss, hits) from the Triton row kernel, or None, once and for all, if it cannot run here: it fails in
    compilation, before it writes anything, and the chunked path takes over with the logits intact."""
    try:
        return loss_kernel.loss_rows(z, labels, hard, soft_weight=soft_weight, write_grad=write_grad, **teacher_args)
    except Exception as err:  # noqa: BLE001 - e.g. a GPU or Triton version the kernel does not compile for
        import warnings

        warnings.warn(f"the Triton loss kernel failed ({type(err).__name__}: {err}); using the compiled chunks", stacklevel=3)
        _KERNEL["enabled"] = False
        return None


def _kernel_serves(z: torch.Tensor, soft: SoftTargets | None) -> bool:
    """The Triton row kernel (train/loss_kernel.py) takes a block on CUDA unless the teacher's logits are made per
    chunk from hidden states (they never exist in full there)."""
    return _KERNEL["enabled"] and loss_kernel.available(z) and (soft is None or soft.logits is not None)


class FusedLinearLoss(torch.autograd.Function):
    """loss = mix of CE(x W^T, labels) and KL(teacher || softmax(x W^T)), chunked; see the module docstring.

    Returns (loss, n_correct): the scalar loss and, for logging, how many valid labels are the argmax
    (not differentiable).
    """

    @staticmethod
    def forward(ctx, x, weight, labels, soft, alpha, chunk_size, gemm_tokens):
        # x: [N, D] states; weight: [V, D]; labels: [N] ids in [0, V) or IGNORE_INDEX, or None; soft: SoftTargets or None
        N = x.size(0)
        dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            xs = x.to(dtype)
            a_w = 0.0 if labels is None else 1.0 - alpha
            b_w = 0.0 if soft is None else alpha
            valid = labels.ne(IGNORE_INDEX) if labels is not None else None
            n_hard = valid.sum().clamp(min=1).float() if valid is not None else None
            want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # False in eval: loss only
            grad_x = torch.empty_like(xs) if want_grad else None
            grad_w = None
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            n_correct = torch.zeros((), dtype=torch.long, device=x.device)
            chunk_fn = _compiled_chunk() if x.device.type == "cuda" else chunk_loss_and_grad
            for g0 in range(0, N, gemm_tokens):
                g1 = min(g0 + gemm_tokens, N)
                z = xs[g0:g1] @ w.t()  # [m, V] logits of the block, in the compute dtype; then their gradient
                y = labels[g0:g1] if labels is not None else None
                hard = valid[g0:g1].float() * (a_w / n_hard) if a_w else None  # per-token CE weight
                part, correct = _block_rows(chunk_fn, z, y, hard, soft if b_w else None, g0, b_w / N, want_grad, chunk_size)
                loss = loss + part
                if correct is not None:
                    n_correct += correct
                if want_grad:
                    grad_x[g0:g1] = z @ w
                    part_w = (z.t() @ xs[g0:g1]).float()
                    grad_w = part_w if grad_w is None else grad_w.add_(part_w)
                del z
        if want_grad:
            ctx.save_for_backward(grad_x.to(x.dtype), grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(n_correct)
        return loss, n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None


def fused_linear_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    soft: SoftTargets | None = None,
    alpha: float | None = None,
    chunk_size: int = 0,
    gemm_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, n_correct) of the output layer `weight` [V, D] on states x [..., D].

    labels [...] (IGNORE_INDEX to skip) gives cross-entropy; soft gives KL to the teacher; with both, `alpha`
    weights KL (default: 1 with soft only, 0 with labels only); with alpha = 1 labels only count top-1 hits.
    chunk_size 0 picks `auto_chunk_size(V)`; gemm_tokens (tokens per GEMM block, rounded to whole chunks) 0 picks
    `auto_gemm_tokens`.
    """
    if labels is None and soft is None:
        raise ValueError("fused_linear_loss needs labels, soft targets, or both")
    if alpha is None:
        alpha = 1.0 if labels is None else 0.0
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the soft-label loss) must be in [0, 1], got {alpha}")
    D = x.size(-1)
    x = x.reshape(-1, D)
    if labels is not None:
        labels = labels.reshape(-1)
    if soft is not None and len(soft) != x.size(0):
        raise ValueError(f"soft targets cover {len(soft)} tokens, states {x.size(0)}")
    if alpha == 1.0 and soft is None:
        raise ValueError("alpha = 1 puts all weight on soft labels, but none were given")
    soft_used = soft if alpha > 0 else None
    # With alpha = 1 labels still count top-1 hits (n_correct), at no cost to the loss.
    chunk_size = chunk_size or auto_chunk_size(weight.size(0))
    gemm_tokens = max(1, -(-gemm_tokens // chunk_size)) * chunk_size if gemm_tokens else auto_gemm_tokens(weight.size(0), chunk_size)
    return FusedLinearLoss.apply(x, weight, labels, soft_used, float(alpha), chunk_size, gemm_tokens)


def reference_loss(x, weight, labels=None, teacher_logits=None, alpha=None):
    """The same loss with full logits and autograd (float64 in the tests): the definition the fused one matches."""
    import torch.nn.functional as F

    if alpha is None:
        alpha = 1.0 if labels is None else 0.0
    z = x.reshape(-1, x.size(-1)) @ weight.t()
    logq = torch.log_softmax(z, -1)
    loss = z.new_zeros(())
    if labels is not None and alpha < 1:
        y = labels.reshape(-1)
        n = y.ne(IGNORE_INDEX).sum().clamp(min=1)
        loss = loss + (1 - alpha) * F.nll_loss(logq, y, ignore_index=IGNORE_INDEX, reduction="sum") / n
    if teacher_logits is not None and alpha > 0:
        logp = torch.log_softmax(teacher_logits.reshape(-1, teacher_logits.size(-1)).to(z.dtype), -1)
        loss = loss + alpha * (logp.exp() * (logp - logq)).sum() / z.size(0)
    return loss
