"""The chunked fused output layer + loss against a float64 autograd reference: loss and both gradients."""

import pytest
import torch

from speculators.train.loss import IGNORE_INDEX, SoftTargets, fused_linear_loss, reference_loss

N, D, V = 37, 16, 53


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    if ignore:
        y[::5] = IGNORE_INDEX
    t = 2 * torch.randn(N, V, generator=g)
    return x, w, y, t


def check(x, w, y, t, alpha, soft_kind="logits", chunk=8, tol=1e-5, dtype=torch.float32, gemm=0):
    xf, wf = x.clone().to(dtype).requires_grad_(), w.clone().to(dtype).requires_grad_()
    soft = None
    if t is not None:
        soft = SoftTargets(logits=t) if soft_kind == "logits" else SoftTargets(hidden=t[0], weight=t[1], scale=t[2])
    loss, _ = fused_linear_loss(xf, wf, y, soft, alpha=alpha, chunk_size=chunk, gemm_tokens=gemm)
    loss.backward()
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    teacher = None if t is None else (t if soft_kind == "logits" else (t[0].double() @ t[1].double().t()) * t[2])
    ref = reference_loss(xr, wr, y, teacher, alpha=alpha)
    ref.backward()
    assert rel(loss.detach(), ref.detach()) < tol
    assert rel(xf.grad, xr.grad) < tol
    assert rel(wf.grad, wr.grad) < tol


@pytest.mark.parametrize("chunk, gemm", [(4, 8), (5, 13), (8, 0)])
def test_several_gemm_blocks_match_one(chunk, gemm):
    """Logits from one matmul per GEMM block (whole chunks, the last one short), gradients written over them, and
    the weight gradient summed over blocks: the same loss and gradients as the float64 reference."""
    x, w, y, t = make(3)
    check(x, w, y, t, alpha=0.5, chunk=chunk, gemm=gemm)
    check(x, w, y, None, alpha=0.0, chunk=chunk, gemm=gemm)


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_cross_entropy_with_ignored_labels(chunk):
    x, w, y, _ = make()
    check(x, w, y, None, alpha=0.0, chunk=chunk)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_kl_to_teacher_logits(chunk):
    x, w, _, t = make(1)
    check(x, w, None, t, alpha=1.0, chunk=chunk)


def test_mix_of_hard_and_soft():
    x, w, y, t = make(2)
    check(x, w, y, t, alpha=0.3)


def test_kl_teacher_from_hidden_and_draft_rows():
    # Teacher logits computed per chunk from hidden states and the draft rows of the target's lm_head.
    x, w, _, _ = make(3)
    g = torch.Generator().manual_seed(7)
    E, Vt = 12, 90
    h, lm_head = torch.randn(N, E, generator=g), torch.randn(Vt, E, generator=g)
    draft = torch.randperm(Vt, generator=g)[:V]
    check(x, w, None, (h, lm_head[draft], 0.5), alpha=1.0, soft_kind="hidden")


def test_draft_vocab_labels_outside_are_ignored():
    # Out-of-draft labels are mapped to IGNORE_INDEX by the caller; the loss is CE over the remaining ones.
    x, w, y, _ = make(4, ignore=False)
    y_draft = torch.where(y < V // 2, y, IGNORE_INDEX)
    check(x, w, y_draft, None, alpha=0.0)


def test_all_labels_ignored_gives_zero_loss_and_grads():
    x, w, _, _ = make(5)
    y = torch.full((N,), IGNORE_INDEX)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, n_correct = fused_linear_loss(xf, wf, y, chunk_size=8)
    loss.backward()
    assert loss.item() == 0 and n_correct.item() == 0 and xf.grad.abs().max() == 0 and wf.grad.abs().max() == 0


def test_n_correct_counts_argmax_hits_and_grad_scales():
    x, w, y, _ = make(6)
    xf = x.clone().requires_grad_()
    loss, n_correct = fused_linear_loss(xf, w, y, chunk_size=8)
    z = x @ w.t()
    valid = y.ne(IGNORE_INDEX)
    assert n_correct.item() == (z.argmax(-1).eq(y) & valid).sum().item()
    (3 * loss).backward()
    xr = x.double().requires_grad_()
    (3 * reference_loss(xr, w.double(), y)).backward()
    assert rel(xf.grad, xr.grad) < 1e-5


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["autocast", "bf16_params"])
def test_bf16_close_to_float64(device, mode):
    # The GPU paths: fp32 heads under bf16 autocast (DDP), or bf16 weights (FSDP2 / DeepSpeed compute copies);
    # bf16 matmuls with fp32 accumulation, fp32 softmax. Relative error at bf16 level.
    x, w, y, t = make(8)
    x, w, y, t = x.to(device), w.to(device), y.to(device), t.to(device)
    dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    xf, wf = x.clone().to(dtype).requires_grad_(), w.clone().to(dtype).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "autocast"):
        loss, _ = fused_linear_loss(xf, wf, y, SoftTargets(logits=t.bfloat16()), alpha=0.5, chunk_size=8)
    loss.backward()
    assert wf.grad.dtype == dtype and xf.grad.dtype == dtype
    xr, wr = x.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    ref = reference_loss(xr, wr, y.cpu(), t.bfloat16().double().cpu(), alpha=0.5)
    ref.backward()
    assert rel(loss.detach().cpu(), ref.detach()) < 2e-2
    assert rel(xf.grad.cpu(), xr.grad) < 3e-2 and rel(wf.grad.cpu(), wr.grad) < 3e-2


@pytest.mark.parametrize("device", DEVICES)
def test_realistic_shapes_kl_from_hidden_bf16(device):
    # A 152k-vocabulary-like draft slice at a modest size: the chunked hidden-path KL against float64.
    g = torch.Generator().manual_seed(11)
    n, d, e, v = 300, 64, 48, 4096
    x, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    h, lm = torch.randn(n, e, generator=g), torch.randn(v, e, generator=g) / e**0.5
    xf, wf = x.clone().to(device).requires_grad_(), w.clone().to(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        soft = SoftTargets(hidden=h.to(device).bfloat16(), weight=lm.to(device).bfloat16())
        loss, _ = fused_linear_loss(xf, wf, soft=soft, chunk_size=100)
    loss.backward()
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_loss(xr, wr, None, h.bfloat16().double() @ lm.bfloat16().double().t(), alpha=1.0)
    ref.backward()
    assert rel(loss.detach().cpu(), ref.detach()) < 2e-2
    assert rel(xf.grad.cpu(), xr.grad) < 3e-2 and rel(wf.grad.cpu(), wr.grad) < 3e-2


def test_bad_alpha_and_missing_targets():
    x, w, y, _ = make()
    with pytest.raises(ValueError, match="alpha"):
        fused_linear_loss(x, w, y, alpha=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_loss(x, w)


def test_soft_targets_read_shifted_positions_of_3d_source():
    # Head i reads the teacher at t + i + 1: a [B, S, V] source with an offset, never a shifted copy.
    B, S, T, off = 3, 14, 11, 2
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(B * T, D, generator=g), torch.randn(V, D, generator=g) / D**0.5
    t3 = torch.randn(B, S, V, generator=g)
    flat = t3[:, off : off + T].reshape(-1, V)
    for chunk in (4, 11, 100):
        a, _ = fused_linear_loss(x, w, soft=SoftTargets(logits=t3, offset=off, T=T), chunk_size=chunk)
        b, _ = fused_linear_loss(x, w, soft=SoftTargets(logits=flat), chunk_size=chunk)
        assert torch.allclose(a, b, rtol=1e-6)


def test_no_grad_eval_gives_same_loss():
    x, w, y, t = make(10)
    with torch.no_grad():
        a, na = fused_linear_loss(x, w, y, SoftTargets(logits=t), alpha=0.5, chunk_size=8)
    b, nb = fused_linear_loss(x.clone().requires_grad_(), w, y, SoftTargets(logits=t), alpha=0.5, chunk_size=8)
    assert torch.allclose(a, b.detach()) and na == nb


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch 2.11's CPU Inductor fails on this graph (KeyError 'buf10' in loop_body); CUDA runs "
                           "it in test_triton_rows_match_compiled_chunks_cuda, and the trainer falls back to eager")
def test_compiled_chunk_matches_eager():
    """The chunk body CUDA runs under torch.compile gives the eager numbers (inductor on the CPU here), the
    gradient written over the logits in place included (fp32 and bf16 logits)."""
    from speculators.train.loss import chunk_loss_and_grad

    torch.manual_seed(0)
    n, V = 48, 300
    teacher = torch.randn(n, V)
    y = torch.randint(0, V, (n,))
    y[3] = IGNORE_INDEX
    hard = y.ne(IGNORE_INDEX).float() / (n - 1)
    compiled = torch.compile(chunk_loss_and_grad, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(n, V).to(dtype)
        for args in [(y, hard, teacher, 0.3 / n, True), (y, hard, None, 0.0, True),
                     (None, None, teacher, 1 / n, True), (y, None, teacher, 1 / n, False)]:
            z_eager, z_compiled = z.clone(), z.clone()
            want, got = chunk_loss_and_grad(z_eager, *args), compiled(z_compiled, *args)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            assert (got[1] is None and want[1] is None) or int(got[1]) == int(want[1])
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            assert torch.allclose(z_compiled.float(), z_eager.float(), rtol=tol, atol=1e-7)
            assert torch.equal(z_eager, z) != args[-1]  # the gradient replaced the logits iff asked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton row kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["hard", "soft_shifted", "mix_blocks"])
def test_triton_rows_match_compiled_chunks_cuda(case, dtype):
    """The Triton row kernel (CUDA, whole GEMM blocks) against the compiled chunks and the float64 reference: loss,
    top-1 hits and both gradients; a vocabulary that is not a multiple of its block, ignored labels, a teacher read at
    shifted rows of a [B, S, V] source (as the heads read the target), and several GEMM blocks."""
    from speculators.train import loss as loss_module

    g = torch.Generator().manual_seed(5)
    B, T, off, d, v = 3, 40, 2, 32, 5000
    n = B * T
    x, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = IGNORE_INDEX
    src = 3 * torch.randn(B, T + 4, v, generator=g)
    alpha, gemm, labels = {"hard": (0.0, 0, y), "soft_shifted": (1.0, 0, y), "mix_blocks": (0.4, 48, y)}[case]
    soft = None if case == "hard" else SoftTargets(logits=src.cuda().to(dtype), offset=off, T=T)

    def run(kernel: bool):
        loss_module._KERNEL["enabled"] = kernel
        try:
            xf, wf = x.cuda().to(dtype).requires_grad_(), w.cuda().to(dtype).requires_grad_()
            out, hits = fused_linear_loss(xf, wf, labels.cuda(), soft, alpha=alpha, chunk_size=16, gemm_tokens=gemm)
            out.backward()
            return out.detach().double().cpu(), int(hits), xf.grad.double().cpu(), wf.grad.double().cpu()
        finally:
            loss_module._KERNEL["enabled"] = True

    got, want = run(True), run(False)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_loss(xr, wr, y, None if soft is None else src.to(dtype).double()[:, off : off + T].reshape(n, v), alpha=alpha)
    ref.backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert got[1] == want[1]
    assert all(rel(got[i], want[i]) < tol for i in (0, 2, 3))
    assert rel(got[0], ref.detach()) < tol and rel(got[2], xr.grad) < tol and rel(got[3], wr.grad) < tol


def test_a_failing_row_kernel_hands_over_to_the_chunks(monkeypatch):
    """Where the Triton kernel cannot compile (an unsupported GPU or Triton), training warns once and goes on with
    the chunked path, with the same loss and gradients."""
    from speculators.train import loss as loss_module
    from speculators.train import loss_kernel

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(loss_kernel, "available", lambda z: True)
    monkeypatch.setattr(loss_kernel, "loss_rows", broken)
    monkeypatch.setitem(loss_module._KERNEL, "enabled", True)
    x, w, y, t = make(4)
    with pytest.warns(UserWarning, match="Triton loss kernel failed"):
        check(x, w, y, t, alpha=0.5, gemm=16)
    check(x, w, y, t, alpha=0.5, gemm=16)  # disabled after the first failure: no second attempt
    assert calls == [1]
