"""Sampling is exact and reproducible: processed distributions, the counter RNG, and the first three tokens'
distribution over many seeds against exact float64 probabilities, for plain decoding, a draft model chain
and a heads tree (which must also emit exactly plain decoding's tokens for every seed)."""

import functools
import itertools
import tempfile

import pytest
import torch
from test_infer_common import DEVICE, ids, one_thread, target  # noqa: F401

from speculators import MLPSpeculator, MLPSpeculatorConfig
from speculators.infer import LLM, SamplingParams
from speculators.infer.sampling import argmax, top_k_top_p, uniform

V = 16  # a vocabulary small enough to enumerate three tokens exactly
PROMPT = [3, 7, 1, 12]
N_SEEDS = 1200


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's processing in float64, written out plainly: temperature, top-k, then top-p over the rest."""
    x = logits.double() / temperature
    order = x.argsort(descending=True)
    keep = order[: top_k if top_k > 0 else len(x)]
    p = torch.softmax(x[keep], 0)
    before = p.cumsum(0) - p
    kept = keep[before < top_p] if top_p < 1 else keep
    out = torch.zeros_like(x)
    out[kept] = torch.softmax(x[kept], 0)
    return out


def test_top_k_top_p_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 50, generator=g, dtype=torch.float64) * 3
    top_k = torch.tensor([50, 5, 1, 50, 10, 3])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.5, 0.99], dtype=torch.float64)
    masked = top_k_top_p(logits, top_k, top_p)
    for b, n in itertools.product(range(6), range(3)):
        ref = reference_probs(logits[b, n], 1.0, int(top_k[b]), float(top_p[b]))
        torch.testing.assert_close(masked[b, n].softmax(-1), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("V", [100, 8192, 8193, 151936])
def test_chunked_argmax_is_the_first_maximum(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randint(-3, 4, (3, 5, V), generator=g).to(torch.bfloat16)  # many ties: the first must win
    x[0, 0] = float("-inf")
    x[0, 1, V // 2 :] = float("inf")
    x[1, 2, V - 1] = 9.0  # the maximum in the last (padded) chunk
    x[2, 3, 7], x[2, 3, V - 2] = float("nan"), float("nan")  # NaN wins, as in torch.argmax
    assert torch.equal(argmax(x), x.argmax(-1))
    assert torch.equal(argmax(x.float()), x.float().argmax(-1))


def test_counter_rng_is_uniform_and_keyed():
    u = uniform(torch.tensor([0, 1, 2 ** 40]), torch.tensor([[0, 1], [0, 1], [0, 1]]), 4096)  # [3, 2, V]
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12 ** -0.5) < 0.01
    flat = u.reshape(6, -1)
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(6)).abs().max() < 0.06  # distinct (seed, position) keys: independent streams
    assert torch.equal(u, uniform(torch.tensor([0, 1, 2 ** 40]), torch.tensor([[0, 1], [0, 1], [0, 1]]), 4096))


@functools.cache
def small_target():
    """A 16-token target with sharpened logits (so the distributions are far from uniform), and random heads."""
    model, d = target("llama", seed=2, vocab_size=V, sharpen=12.0)
    torch.manual_seed(4)
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=model.config.hidden_size, n_predict=3,
                                              top_k_tokens_per_head=[4, 3, 2], n_candidates=6))
    hd = tempfile.mkdtemp()
    heads.save_pretrained(hd)
    return model, d, hd


@functools.cache
def exact_joint(temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """P(y1, y2, y3) [V, V, V] from the target's float64 probabilities, processed per position."""
    model, _, _ = small_target()
    with torch.no_grad():
        def probs(prefixes):
            logits = model(torch.tensor(prefixes)).logits[:, -1]
            return torch.stack([reference_probs(l, temperature, top_k, top_p) for l in logits])

        p1 = probs([PROMPT])[0]  # [V]
        p2 = probs([PROMPT + [a] for a in range(V)])  # [V, V]
        p3 = probs([PROMPT + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test, cells with expected count < 5 merged into one."""
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 1e-9:
        assert obs[-1] == 0, "tokens with zero probability were sampled"
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def sample_many(spec, params: SamplingParams) -> list[list[int]]:
    _, d, _ = small_target()
    llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=64, max_num_seqs=64, speculative_config=spec)
    seeded = [params.clone(seed=s) for s in range(N_SEEDS)]
    return ids(llm.generate([{"prompt_token_ids": PROMPT}] * N_SEEDS, seeded, use_tqdm=False))


PARAMS = {
    "temperature": SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True),
    "top_k_top_p": SamplingParams(temperature=1.3, top_k=6, top_p=0.8, max_tokens=3, ignore_eos=True),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_sampling_matches_exact_distribution(name):
    params = PARAMS[name]
    _, d, hd = small_target()
    joint = exact_joint(params.temperature, params.top_k, params.top_p)
    plain = sample_many(None, params)
    specs = {
        "draft_model": {"model": d, "method": "draft_model", "num_speculative_tokens": 3, "adaptive": False},
        "heads_tree": {"model": hd, "method": "mlp_speculator", "adaptive": False},
    }
    for label, outs in [("plain", plain)] + [(k, sample_many(s, params)) for k, s in specs.items()]:
        # Same seed, same tokens: the noise of position P does not depend on who computes it.
        assert outs == plain, label
        y = torch.tensor(outs)  # [N, 3]
        counts = torch.zeros(V, V, V, dtype=torch.long)
        counts.index_put_((y[:, 0], y[:, 1], y[:, 2]), torch.ones(len(y), dtype=torch.long), accumulate=True)
        for what, c, p in [
            ("y1", counts.sum((1, 2)), joint.sum((1, 2))),
            ("y2", counts.sum((0, 2)), joint.sum((0, 2))),
            ("y3", counts.sum((0, 1)), joint.sum((0, 1))),
            ("y1,y2", counts.sum(2).flatten(), joint.sum(2).flatten()),
        ]:
            assert chi_square_p(c, p) > 1e-4, (label, what)
        if label == "plain":
            continue
        assert len(set(map(tuple, outs))) > 10  # really sampling


def test_chi_square_detects_a_wrong_temperature():
    """Negative control: the test above has the power to see temperature 1.0 where 0.8 was asked."""
    outs = torch.tensor(sample_many(None, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)))
    joint = exact_joint(0.8, -1, 1.0).sum(2).flatten()
    counts = torch.bincount(outs[:, 0] * V + outs[:, 1], minlength=V * V)
    assert chi_square_p(counts, joint) < 1e-4


def test_seeds_reproduce_across_batches():
    _, d, hd = small_target()
    spec = {"model": hd, "method": "mlp_speculator", "adaptive": False}
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=123)
    alone = LLM(d, device=DEVICE, dtype="float64", max_model_len=64, max_num_seqs=1, speculative_config=spec)
    first = ids(alone.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False))[0]
    assert ids(alone.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False))[0] == first
    crowd = LLM(d, device=DEVICE, dtype="float64", max_model_len=64, max_num_seqs=4, speculative_config=spec)
    mixed = [SamplingParams(temperature=0.7, max_tokens=5, ignore_eos=True, seed=9), params,
             SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    prompts = [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": PROMPT}, {"prompt_token_ids": [5] * 9}]
    assert ids(crowd.generate(prompts, mixed, use_tqdm=False))[1] == first
    others = {tuple(ids(alone.generate([{"prompt_token_ids": PROMPT}], params.clone(seed=s), use_tqdm=False))[0]) for s in range(8)}
    assert len(others) > 1
