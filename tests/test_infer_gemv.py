"""The Triton GEMV of batch-1 decoding against float64, and `Linear`'s routing (which rows take it).

Runs on CUDA, or on CPU under Triton's interpreter (`TRITON_INTERPRET=1`); skipped without Triton."""

import os

import pytest
import torch
import torch.nn.functional as F

from speculators.infer import gemv as gemv_mod

pytestmark = [
    pytest.mark.skipif(not gemv_mod.available(), reason="needs Triton"),
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA, or TRITON_INTERPRET=1 to run Triton on the CPU"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("config", gemv_mod.CONFIGS[:3] + [(16, 128, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(37, 300, True), (64, 1024, False), (130, 2050, True)])
def test_gemv_matches_float64(config, dtype, N, K, bias):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    x = torch.randn(1, 1, K, generator=g).to(DEVICE, dtype)
    y = gemv_mod.gemv(x, w, b, config)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (1, 1, N) and y.dtype == dtype
    # fp32 sums: the error is the output's own rounding plus K fp32 additions. bf16 rounding is 2^-8 relative
    # on a GPU; Triton's CPU interpreter truncates instead (up to 2^-7).
    tol = (2**-7 if dtype == torch.bfloat16 else 1e-5) * ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol


def test_linear_routes_only_single_rows():
    lin = gemv_mod.Linear(96, 40, bias=True).to(DEVICE)
    calls = []
    real = gemv_mod.gemv
    gemv_mod.gemv = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        x1, x4 = torch.randn(1, 1, 96, device=DEVICE), torch.randn(2, 2, 96, device=DEVICE)
        ref1 = F.linear(x1, lin.weight, lin.bias)
        assert torch.equal(lin(x1), ref1) and not calls  # no config: cuBLAS / F.linear
        lin.gemv_config = (8, 64, 4)
        torch.testing.assert_close(lin(x1), ref1, rtol=1e-5, atol=1e-5)
        assert torch.equal(lin(x4), F.linear(x4, lin.weight, lin.bias))
        assert calls == [torch.Size([1, 1, 96])]
    finally:
        gemv_mod.gemv = real


def test_gemv_rejects_a_transposed_weight():
    w = torch.randn(32, 16, device=DEVICE).t()
    with pytest.raises(ValueError, match="contiguous along K"):
        gemv_mod.gemv(torch.randn(1, 32, device=DEVICE), w, None, (8, 64, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times kernels on a GPU")
def test_tune_chooses_per_shape_and_keeps_outputs():
    from speculators.infer.model import ModelArgs, random_model

    args = ModelArgs(vocab_size=1000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, intermediate_size=1408,
                     norm_eps=1e-6, qkv_bias=True)
    model = random_model(args, torch.bfloat16, torch.device("cuda"))
    report = gemv_mod.tune(model)
    assert set(report) == {(768, 512), (512, 512), (2816, 512), (512, 1408), (1000, 512)}
    for (N, K), r in report.items():
        assert r["chosen"] in ("gemv", "cublas") and r["best_us"] <= r["cublas_us"]
    for m in model.modules():
        if isinstance(m, gemv_mod.Linear):
            m.gemv_config = m.gemv_config or (8, 512, 4)
            x = torch.randn(1, 1, m.in_features, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())
            torch.testing.assert_close(m(x).float(), ref, rtol=2e-2, atol=2e-2)
