"""Shared helpers of the infer tests: tiny float64 checkpoints on disk, a character tokenizer, fitted heads.

Everything runs in float64 on CPU, so our model and transformers agree to ~1e-15 and greedy comparisons
never hinge on a near-tie.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile

import pytest
import torch
from tiny_models import tiny_target

from speculators import MLPSpeculator, MLPSpeculatorConfig, TargetAdapter

logging.getLogger("speculators.infer.llm").setLevel(logging.ERROR)

VOCAB = 128
# Where the runtime runs in these tests (the HF references stay on CPU): scripts/gpu_infer_check.sh sets cuda.
DEVICE = os.environ.get("SPECULATORS_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and unaffected by other processes) on one thread; import this into a module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def char_tokenizer():
    """ASCII characters as tokens (ids 3..127), <pad>/<s>/</s> = 0/1/2, with a one-line chat template."""
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chr(i): i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers.Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return out


def save(model, tokenizer=True) -> str:
    d = tempfile.mkdtemp(prefix="infer-test-")
    model.save_pretrained(d)
    if tokenizer:
        char_tokenizer().save_pretrained(d)
    return d


@functools.cache
def target(arch: str = "llama", seed: int = 0, vocab_size: int = VOCAB, sharpen: float = 1.0):
    """(HF model in float64 with EOS disabled for generate, its checkpoint dir)."""
    model = tiny_target(arch, vocab_size=vocab_size, seed=seed).double()
    if sharpen != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    d = save(model, tokenizer=vocab_size == VOCAB)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, d


@functools.cache
def perturbed(arch: str = "llama", scale: float = 0.5) -> str:
    """The target with noise added to every weight (relative to its spread): a draft that agrees partly."""
    model = tiny_target(arch).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std().clamp(min=1e-3) * scale)
    return save(model, tokenizer=False)


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


@functools.cache
def random_heads(arch: str = "llama", n_predict: int = 3) -> str:
    torch.manual_seed(3)
    model, _ = target(arch)
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=VOCAB, emb_dim=model.config.hidden_size, n_predict=n_predict))
    d = tempfile.mkdtemp(prefix="infer-heads-")
    heads.save_pretrained(d)
    return d


@functools.cache
def fitted_heads(arch: str = "llama", n_predict: int = 3, steps: int = 120) -> str:
    """Heads fitted (a few seconds of Adam) on the target's own greedy continuations, so trees accept several
    tokens, often along paths other than the first."""
    model, _ = target(arch)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(3, VOCAB, (32, 4), generator=g)
    with torch.no_grad():
        seqs = model.generate(prompts, max_new_tokens=40, do_sample=False, eos_token_id=None)  # [32, 44]
        state = TargetAdapter(model)(seqs).hidden_states.float()  # [32, 44, E]
    torch.manual_seed(0)
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=VOCAB, emb_dim=model.config.hidden_size, n_predict=n_predict))
    T = seqs.size(1) - 1 - n_predict
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = heads(state[:, :T], seqs[:, 1 : T + n_predict + 1])  # [n, B, T, V]
        labels = torch.stack([seqs[:, i + 2 : i + 2 + T] for i in range(n_predict)])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = tempfile.mkdtemp(prefix="infer-fitted-")
    heads.save_pretrained(d)
    return d


def ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_helpers_build():  # keeps this module collectable and checks the char tokenizer round-trips
    tok = char_tokenizer()
    assert tok.decode(tok.encode("ab c\n", add_special_tokens=False)) == "ab c\n"
