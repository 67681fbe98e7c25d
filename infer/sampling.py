"""Sampling without generators or host syncs: a counter-based RNG and the Gumbel-max trick.

The token at absolute position P of a request is argmax_v(log p(v) + g(seed, P, v)), with p the target's
processed distribution (temperature, then top-k, then top-p, as vLLM) and g Gumbel noise from a hash of
(seed, P, v). Each position gets fresh independent noise, so this samples p exactly; and since the noise does
not depend on which step or tree node computes position P, speculative decoding emits exactly the tokens plain
decoding emits for the same seed (whatever the batch, tree size or acceptance), which makes it lossless by
construction and reproducible. Greedy rows take the argmax of the raw logits.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int64 tensors holding values in [0, 2^32).

    The multipliers are below 2^31, so no product overflows int64: identical results on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x46CA68B5) & M32
    x = x ^ (x >> 16)
    return x


def uniform(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform noise in (0, 1), float32 [B, N, V], a pure function of (seed [B], position [B, N], vocab index)."""
    seed = seed.long()
    key = _mix32((seed & M32) ^ _mix32(((seed >> 32) & M32) ^ 0x3C6EF372))  # [B]
    key = _mix32(key.unsqueeze(1) ^ _mix32((position.long() * 0x2545F491 + 0x1B873593) & M32))  # [B, N]
    v = _mix32((torch.arange(vocab_size, device=seed.device) * 0x19660D + 0x6B43A9B5) & M32)  # [V]
    bits = _mix32(key.unsqueeze(-1) ^ v)  # [B, N, V]
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(seed, position, vocab_size)))


ARGMAX_CHUNK = 4096


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1), the first maximum, in two reductions. Over a vocabulary of 100k+ one argmax per row runs on
    one thread block at batch 1 (28 us on the H100 for 128k logits); chunks of 4096 spread it over the GPU."""
    V = x.size(-1)
    if V <= 2 * ARGMAX_CHUNK:
        return x.argmax(-1)
    n = -(-V // ARGMAX_CHUNK)
    padded = torch.nn.functional.pad(x, (0, n * ARGMAX_CHUNK - V), value=float("-inf"))
    best, at = padded.unflatten(-1, (n, ARGMAX_CHUNK)).max(-1)  # per chunk: value, first index
    chunk = best.argmax(-1, keepdim=True)  # the first chunk holding the maximum
    return (chunk * ARGMAX_CHUNK + at.gather(-1, chunk)).squeeze(-1)


def top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the logits x [B, N, V] outside each row's top-k [B] (V = off), then outside the smallest
    set of most likely tokens whose probability reaches top_p [B] (1 = off), as vLLM does."""
    V = x.size(-1)
    srt = x.sort(dim=-1, descending=True).values  # [B, N, V]
    idx = torch.arange(V, device=x.device)
    in_k = idx < top_k.view(-1, 1, 1)
    srt = srt.masked_fill(~in_k, float("-inf"))
    probs = srt.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the more likely tokens
    keep = in_k & ((before < top_p.view(-1, 1, 1)) | (top_p.view(-1, 1, 1) >= 1.0))
    n_keep = keep.sum(-1, keepdim=True).clamp(min=1)  # a prefix of the sorted order
    threshold = srt.gather(-1, n_keep - 1)
    return x.masked_fill(x < threshold, float("-inf"))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Tokens [B, N] for logits [B, N, V]; position [B, N] is the absolute position of the token drawn.

    mode (static, chosen by the host per step): "greedy" (every row greedy), "sample" (temperature only),
    "filter" (some row uses top-k or top-p). Rows with temperature 0 are greedy in every mode.
    """
    # "filter" mode keeps torch's one-pass argmax: with a batch of more than one, torch 2.11's Inductor failed to
    # compile that mode with the chunked argmax (H100, InductorError in Triton codegen's get_block_shape), as with
    # every variant of it tried; whether it compiles with torch's argmax was not checked on a GPU.
    first_max = argmax if mode != "filter" else (lambda t: t.argmax(-1))
    greedy = first_max(logits)
    if mode == "greedy":
        return greedy
    x = (logits if logits.dtype == torch.float64 else logits.float()) / temperature.clamp(min=1e-5).view(-1, 1, 1)
    if mode == "filter":
        x = top_k_top_p(x, top_k, top_p)
    drawn = first_max(x + gumbel(seed, position, x.size(-1)))
    return torch.where((temperature > 0).view(-1, 1), drawn, greedy)
