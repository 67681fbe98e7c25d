"""Greedy decoding is token-identical to transformers' `generate`, for every method, batch and prompt length."""

import functools
import tempfile

import pytest
import torch
from test_infer_common import (  # noqa: F401
    DEVICE,
    fitted_heads, greedy_reference, ids, one_thread, perturbed, random_heads, save, target,
)

from speculators.infer import LLM, SamplingParams

PROMPTS = [[5, 17, 33, 9], [7] * 20, [11], [100, 90, 80, 70, 60, 50]]
MAX_TOKENS = [40, 25, 33, 50]


@functools.cache
def references(arch: str) -> list[list[int]]:
    model, _ = target(arch)
    return [greedy_reference(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]


def run(d, spec=None, prompts=PROMPTS, max_tokens=MAX_TOKENS, max_num_seqs=3, **kw):
    llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=128, max_num_seqs=max_num_seqs, speculative_config=spec, **kw)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def spec_for(method: str, arch: str):
    if method == "plain":
        return None
    if method == "random_heads":
        return {"model": random_heads(arch), "method": "mlp_speculator", "adaptive": False}
    if method == "fitted_heads":
        return {"model": fitted_heads(arch), "method": "mlp_speculator", "adaptive": False}
    if method == "fitted_chain":
        return {"model": fitted_heads(arch), "method": "mlp_speculator", "top_k_tokens_per_head": [1, 1, 1], "n_candidates": 1, "adaptive": False}
    if method == "draft_self":
        return {"model": target(arch)[1], "method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}
    if method == "draft_perturbed":
        return {"model": perturbed(arch, 0.2), "method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}
    raise AssertionError(method)


METHODS = ["plain", "random_heads", "fitted_heads", "fitted_chain", "draft_self", "draft_perturbed"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_ragged_batch_matches_hf(arch, method):
    """Prompts of 1-20 tokens and different max_tokens, 3 slots for 4 requests (one waits for a free slot)."""
    outs = run(target(arch)[1], spec_for(method, arch))
    assert ids(outs) == references(arch)
    taus = [o.metrics.mean_tokens_per_step for o in outs]
    if method == "plain":
        assert all(t == 1.0 for t in taus)
    if method == "draft_self":  # every draft accepted: k + 1 tokens per step but the first (prefill) and last
        for o in outs:
            assert all(n == 4 for n in o.metrics.tokens_per_step[1:-1])
            assert o.metrics.acceptance_rates == [1.0, 1.0, 1.0] or len(o.metrics.tokens_per_step) <= 3
    if method == "draft_perturbed":
        tau = sum(o.metrics.generated_tokens for o in outs) / sum(o.metrics.target_steps for o in outs)
        assert 1.2 < tau < 3.5
    if method == "fitted_heads":
        tau = sum(o.metrics.generated_tokens for o in outs) / sum(o.metrics.target_steps for o in outs)
        assert tau > 1.8
        assert any(c[2] > 0 for c in (o.metrics.acceptance_counts for o in outs))


@pytest.mark.parametrize("method", ["plain", "fitted_heads", "draft_perturbed"])
def test_single_requests_match_hf(method):
    ref = references("llama")
    for i in (0, 2):
        outs = run(target("llama")[1], spec_for(method, "llama"), [PROMPTS[i]], [MAX_TOKENS[i]], max_num_seqs=1)
        assert ids(outs) == [ref[i]]


def test_adaptive_rule_keeps_outputs():
    """With the adaptive rule on, shapes change from step to step (timing, probes); outputs do not."""
    llm = LLM(target("llama")[1], dtype="float64", max_model_len=128, max_num_seqs=4, device=DEVICE,
              speculative_config={"model": fitted_heads("llama"), "method": "mlp_speculator"})
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS], use_tqdm=False)
    assert ids(outs) == references("llama")
    stats = llm.stats()
    assert set(stats["tau"]) == {"plain", "chain3", "tree[5, 4, 3]x5"} and stats["latency_ms"]


def test_hf_fallback_matches_hf():
    """A GPT-2 target runs on transformers' modeling code (custom 4D masks, slot cache), plain and speculative."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    d = save(model, tokenizer=False)
    ref = [greedy_reference(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    for spec in (None, {"model": d, "method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}):
        llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=128, max_num_seqs=3, speculative_config=spec)
        assert type(llm.engine.target).__name__ == "HFModel"
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS], use_tqdm=False)
        assert ids(outs) == ref


def test_hf_impl_with_heads_tree():
    """model_impl="hf" on a Llama target: the tree path (hidden-state capture, compaction) on HF's code."""
    outs = run(target("llama")[1], spec_for("fitted_heads", "llama"), model_impl="hf")
    assert ids(outs) == references("llama")


def test_own_and_hf_logits_agree():
    from speculators.infer.llm import load_causal_lm

    for arch in ("llama", "qwen2"):
        model, d = target(arch)
        ours, _, _ = load_causal_lm(d, torch.float64, torch.device("cpu"), 64, "own")
        ours.setup_cache(1, 64)
        tokens = torch.tensor([[3, 9, 27, 81, 1, 5]])
        pos = torch.arange(6).unsqueeze(0)
        mask = (torch.arange(6) <= pos.unsqueeze(-1)).unsqueeze(1)
        _, logits = ours(tokens, pos, pos, mask, slice(0, 1), 6)
        torch.testing.assert_close(logits, model(tokens).logits, rtol=0, atol=1e-10)


def test_llama3_rope_scaling_matches_hf():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}, rope_theta=500000.0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    model.generation_config.eos_token_id = None
    prompt = list(range(3, 60))
    llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=256, max_num_seqs=1)
    assert type(llm.engine.target).__name__ == "Transformer"
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert ids(out) == [greedy_reference(model, prompt, 30)]


def test_mistral_and_sliding_windows():
    """Mistral runs on our model while its window cannot apply; a window inside the context is refused clearly."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=256)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    d = save(model, tokenizer=False)
    model.generation_config.eos_token_id = None
    llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=256, max_num_seqs=2)
    assert type(llm.engine.target).__name__ == "Transformer"
    out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert ids(out) == [greedy_reference(model, p, 30) for p in PROMPTS[:2]]
    with pytest.raises(ValueError, match=r"sliding-window attention \(window 256\).*max_model_len <= 256 \(got 512\)"):
        LLM(d, device=DEVICE, dtype="float64", max_model_len=512)


def test_sequences_cross_cache_buckets():
    """Attention reads cache slots [0, S) for a bucketed S: sequences growing from one bucket into the next."""
    model, d = target("llama")
    prompts = [list(range(3, 103)), [9, 8, 7]]
    llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=400, max_num_seqs=2,
              speculative_config=spec_for("fitted_heads", "llama"))
    assert llm.engine.seq_buckets == [128, 256, 416]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False)
    assert ids(outs) == [greedy_reference(model, p, 200) for p in prompts]
