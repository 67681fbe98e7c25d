"""A Triton kernel for the loss rows of `train/loss.py` on CUDA: two passes over a row of logits instead of ~4.

Per row of student logits z [V] (bf16 / fp16 / fp32) with an optional teacher row t [V] and label y, the kernel
computes in fp32 what `chunk_loss_and_grad` computes: the row's weighted CE and KL terms, whether argmax z == y,
and dl/dz, written over z. Pass 1 keeps running max / sum-of-exp (online softmax) of z and t and z's argmax;
pass 2 forms q, p, the loss terms and the gradient. No fp32 temporaries exist outside registers, so a whole GEMM
block ([16k, 32k]) is one launch. The profile on the H100 showed the compiled chunk body at 250-350 us per
[1024, 32768] chunk (Inductor's pick varied by run) against ~110 us of memory traffic (two reads, one write).

The teacher is read in place from its [B, S, V] source at rows (b, offset + j) for flat row r = b * T + j, so the
heads' shifted views of the target need no copy.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled / eager chunk serves
    triton = None


def available(z: torch.Tensor) -> bool:
    return triton is not None and z.is_cuda and z.dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:

    @triton.jit
    def _loss_rows(z_ptr, z_stride, t_ptr, t_stride_b, t_stride_s, t_offset, T, t_row0, t_scale, y_ptr, hw_ptr, loss_ptr,
                   correct_ptr, V, soft_weight, HAS_T: tl.constexpr, HAS_Y: tl.constexpr, HAS_HW: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_stride
        r = t_row0 + row  # the teacher's flat row
        t_row = t_ptr + (r // T) * t_stride_b + (t_offset + r % T) * t_stride_s
        cols = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        # Pass 1: online logsumexp of z and t, argmax of z.
        m_z = tl.full([BLOCK], neg_inf, tl.float32)
        s_z = tl.zeros([BLOCK], tl.float32)
        m_t = tl.full([BLOCK], neg_inf, tl.float32)
        s_t = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], neg_inf, tl.float32)
        best_i = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            c = start + cols
            ok = c < V
            z = tl.load(z_row + c, mask=ok, other=neg_inf).to(tl.float32)
            m_new = tl.maximum(m_z, z)
            s_z = s_z * tl.exp(m_z - m_new) + tl.where(ok, tl.exp(z - m_new), 0.0)
            s_z = tl.where(m_new == neg_inf, 0.0, s_z)
            m_z = m_new
            better = z > best  # strict: the first maximum wins per lane, as torch.argmax returns the first
            best_i = tl.where(better, c, best_i)
            best = tl.where(better, z, best)
            if HAS_T:
                t = tl.load(t_row + c, mask=ok, other=neg_inf).to(tl.float32) * t_scale
                mt_new = tl.maximum(m_t, t)
                s_t = s_t * tl.exp(m_t - mt_new) + tl.where(ok, tl.exp(t - mt_new), 0.0)
                s_t = tl.where(mt_new == neg_inf, 0.0, s_t)
                m_t = mt_new
        mz = tl.max(m_z, 0)
        lse_z = mz + tl.log(tl.sum(s_z * tl.exp(m_z - mz), 0))
        top = tl.max(best, 0)
        arg = tl.min(tl.where(best == top, best_i, V), 0)  # the first column holding the maximum
        if HAS_T:
            mt = tl.max(m_t, 0)
            lse_t = mt + tl.log(tl.sum(s_t * tl.exp(m_t - mt), 0))
        zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        loss = zero
        hw = zero
        y = -1
        if HAS_Y:
            y = tl.load(y_ptr + row).to(tl.int32)
            tl.store(correct_ptr + row, ((arg == y) & (y >= 0)).to(tl.int32))
            if HAS_HW:
                hw = tl.load(hw_ptr + row)
                if y >= 0:
                    loss = -hw * (tl.load(z_row + y).to(tl.float32) - lse_z)
        # Pass 2: loss terms and dl/dz = (hw + sw) q - hw onehot(y) - sw p.
        kl = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            ok = c < V
            z = tl.load(z_row + c, mask=ok, other=0.0).to(tl.float32)
            logq = z - lse_z
            q = tl.exp(logq)
            dz = hw * (q - tl.where(c == y, 1.0, 0.0))
            if HAS_T:
                t = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32) * t_scale
                logp = t - lse_t
                p = tl.exp(logp)
                kl += tl.where(ok & (p > 0), p * (logp - logq), 0.0)
                dz += soft_weight * (q - p)
            if WRITE_GRAD:
                tl.store(z_row + c, dz.to(z_ptr.dtype.element_ty), mask=ok)
        if HAS_T:
            loss += soft_weight * tl.sum(kl, 0)
        tl.store(loss_ptr + row, loss)


def loss_rows(z, labels, hard_weight, teacher, soft_weight: float, write_grad: bool, t_offset: int = 0, t_T: int = 0,
              t_row0: int = 0, t_scale: float = 1.0):
    """(summed loss, top-1 hits or None) of the rows z [n, V]; dl/dz replaces z when write_grad.

    labels [n] or None; hard_weight [n] fp32 or None; teacher: None, [n, V], or a [B, S, V] source read (times
    t_scale) at rows (r // t_T, t_offset + r % t_T) for r = t_row0 + i, i the row of z.
    """
    n, V = z.shape
    if z.stride(1) != 1:
        raise ValueError("loss_rows needs rows of z contiguous")
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    correct = torch.empty(n, dtype=torch.int32, device=z.device) if labels is not None else loss
    if teacher is not None:
        t3 = teacher if teacher.dim() == 3 else teacher.unsqueeze(0)
        if t3.stride(2) != 1 or t3.size(2) != V:
            raise ValueError(f"teacher rows must be contiguous with {V} columns, got {tuple(t3.shape)}")
        t_args = (t3, t3.stride(0), t3.stride(1), t_offset, t_T or t3.size(1), t_row0, float(t_scale))
    else:
        t_args = (z, 0, 0, 0, 1, 0, 1.0)
    y = labels.contiguous() if labels is not None else loss
    hw = hard_weight.contiguous() if hard_weight is not None else loss
    _loss_rows[(n,)](z, z.stride(0), *t_args, y, hw, loss, correct, V, float(soft_weight),
                     HAS_T=teacher is not None, HAS_Y=labels is not None, HAS_HW=hard_weight is not None,
                     WRITE_GRAD=write_grad, BLOCK=2048, num_warps=8)
    return loss.sum(), (correct.sum() if labels is not None else None)
