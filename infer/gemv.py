"""Matrix-vector products for batch-1 decoding: a Triton GEMV where it beats cuBLAS on this GPU.

At batch 1 a decode step's linear layers are matrix-vector products bound by reading the weights. cuBLAS runs
some of these shapes far below the copy bandwidth (on the H100 the 4096 x 4096 attention output projection of
Llama-3-8B ran on 64 thread blocks at 55% of it: docs/BENCHMARKS.md), so `tune` times cuBLAS against a few
tile shapes of the kernel below for every weight shape of a model, over all of that shape's weights (so the
timing reads HBM, not L2), and switches a `Linear` to the kernel only where the kernel is faster. Rows of more
than one token (batches, tree verification, prefill) always go to cuBLAS.

The kernel is a custom op (`torch.library.triton_op`), so torch.compile keeps it inside compiled graphs and
CUDA graphs capture it. Without Triton (CPU machines) nothing changes.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: every Linear stays on F.linear
    triton = None

# (BLOCK_N, BLOCK_K, num_warps) tried by `tune`: output rows per program, reduction tile, warps.
# The best of a sweep on the H100 (.diag, 2026-11-25) for Llama-3-8B's and Qwen2.5-1.5B's shapes.
CONFIGS = [(1, 1024, 4), (1, 2048, 8), (2, 1024, 4), (2, 2048, 8), (4, 512, 8), (8, 512, 8), (8, 2048, 4), (16, 1024, 8)]


def available() -> bool:
    return triton is not None


class Linear(nn.Linear):
    """nn.Linear whose single-row calls (x of shape [..., 1, K] with one row in all) may use the Triton GEMV.

    `gemv_config` is None (cuBLAS always) until `tune` sets it for this weight shape."""

    gemv_config: tuple[int, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_config is not None and math.prod(x.shape[:-1]) == 1:
            return gemv(x, self.weight, self.bias, self.gemv_config)
        return F.linear(x, self.weight, self.bias)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[n] = sum_k x[k] * w[n, k] for BLOCK_N rows n of w; w is read along k (its contiguous dim).
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # one sum per lane; reduced once at the end
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_ok = k < K
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @torch.library.triton_op("speculators::gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
        N, K = weight.shape
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(N, block_n),)
        torch.library.wrap_triton(_gemv_kernel)[grid](
            x, weight, bias if bias is not None else weight, y, N, K, weight.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
        return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple[int, int, int]) -> torch.Tensor:
    """F.linear(x, weight, bias) for x holding one row of K values (any leading shape of size 1), fp32 sums."""
    if weight.stride(1) != 1:
        raise ValueError(f"gemv needs a weight contiguous along K, got strides {weight.stride()}")
    return _gemv_op(x.contiguous(), weight, bias, *config)


def reset(model: nn.Module) -> None:
    """Every Linear of `model` back on F.linear (cuBLAS)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.gemv_config = None


_TUNED: dict[tuple, dict] = {}


def _seconds(fn, reps: int) -> float:
    """GPU seconds per call of fn, replayed from a CUDA graph: launched eagerly, a Triton custom op costs more
    host time than the kernel runs, while the engine replays captured steps."""
    fn()  # compile / warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


@torch.no_grad()
def tune(model: nn.Module, reps: int = 5, configs: list[tuple[int, int, int]] = CONFIGS) -> dict[tuple[int, int], dict]:
    """Choose cuBLAS or a GEMV tile shape for every weight shape of `model`'s `Linear`s (CUDA + Triton only).

    Each candidate runs one single-row product per weight of that shape, every weight in turn (one pass reads
    all of them from HBM), `reps` passes. Sets `gemv_config` on every Linear of the shape and returns, per (N, K):
    count (Linears), cublas_us and best_us (microseconds per product), config (None: cuBLAS), chosen, gb_per_s."""
    reset(model)
    by_shape: dict[tuple[int, int, torch.dtype], list[Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, Linear):
            by_shape[(*module.weight.shape, module.weight.dtype)].append(module)
    report = {}
    for (N, K, dtype), modules in by_shape.items():
        device = modules[0].weight.device
        if not available() or device.type != "cuda":
            continue
        key = (torch.cuda.get_device_name(device), N, K, dtype)
        if key in _TUNED:  # one choice per shape per process: engines built later round exactly as the first
            for m in modules:
                m.gemv_config = _TUNED[key]["config"]
            report[(N, K)] = _TUNED[key]
            continue
        x = torch.randn(1, 1, K, dtype=dtype, device=device)

        def run(config):
            for m in modules:
                if config:
                    gemv(x, m.weight, m.bias, config)
                else:
                    F.linear(x, m.weight, m.bias)

        per = len(modules)
        cublas = _seconds(lambda: run(None), reps) / per
        best, best_s = None, cublas
        ref = F.linear(x.float(), modules[0].weight.float(), None if modules[0].bias is None else modules[0].bias.float())
        for config in configs:
            try:
                out = gemv(x, modules[0].weight, modules[0].bias, config).float()
                s = _seconds(lambda c=config: run(c), reps) / per
            except Exception as err:  # noqa: BLE001 - a tile shape this GPU / Triton cannot build: skip it
                warnings.warn(f"gemv config {config} failed for {N}x{K} ({type(err).__name__}: {err})", stacklevel=2)
                continue
            if not torch.allclose(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
                raise RuntimeError(f"gemv {config} disagrees with F.linear for weight {N}x{K}")
            if s < best_s:
                best, best_s = config, s
        for m in modules:
            m.gemv_config = best
        report[(N, K)] = _TUNED[key] = {"count": per, "cublas_us": cublas * 1e6, "best_us": best_s * 1e6, "config": best,
                          "chosen": "gemv" if best else "cublas", "gb_per_s": N * K * modules[0].weight.element_size() / best_s / 1e9}
    return report
