"""The target adapter: final-norm hidden states + logits from one forward, and compatibility errors."""

import pytest
import torch
from tiny_models import HIDDEN, VOCAB, tiny_target

from speculators import MLPSpeculator, MLPSpeculatorConfig, TargetAdapter, check_compatible


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapter_returns_final_norm_states_and_logits(arch):
    model = tiny_target(arch)
    adapter = TargetAdapter(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    out = adapter(ids, attention_mask=mask)
    base = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
    assert out.hidden_states.shape == (2, 9, HIDDEN) and out.logits.shape == (2, 9, VOCAB)
    assert torch.equal(out.hidden_states, base)
    assert torch.equal(out.logits, model(input_ids=ids).logits)
    # The logits are the lm_head applied to exactly these states.
    assert torch.allclose(model.lm_head(out.hidden_states), out.logits)
    assert (adapter.hidden_size, adapter.vocab_size) == (HIDDEN, VOCAB)


def test_adapter_feeds_heads_end_to_end():
    model = tiny_target("qwen2")
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=VOCAB, emb_dim=HIDDEN, n_predict=3))
    check_compatible(heads.config, model)
    ids = torch.randint(0, VOCAB, (2, 9 + 3 + 1))  # T + n_predict + 1: head i at t predicts ids[t + i + 2]
    out = TargetAdapter(model)(ids[:, :9])
    logits = heads(out.hidden_states, ids[:, 1:])
    assert logits.shape == (3, 2, 9, VOCAB) and torch.isfinite(logits).all()


def test_adapter_respects_logits_to_keep():
    model = tiny_target("llama")
    out = TargetAdapter(model)(torch.randint(0, VOCAB, (1, 6)), logits_to_keep=1)
    assert out.hidden_states.shape == (1, 1, HIDDEN) and out.logits.shape == (1, 1, VOCAB)


def test_incompatible_hidden_size_names_both_numbers():
    model = tiny_target("llama")
    heads = MLPSpeculatorConfig(vocab_size=VOCAB, emb_dim=HIDDEN + 8, n_predict=2)
    with pytest.raises(ValueError, match=rf"emb_dim = {HIDDEN + 8}.*hidden size {HIDDEN}"):
        check_compatible(heads, model)


def test_incompatible_vocab_names_both_numbers():
    model = tiny_target("llama")
    heads = MLPSpeculatorConfig(vocab_size=VOCAB * 2, emb_dim=HIDDEN, n_predict=2)
    with pytest.raises(ValueError, match=rf"vocab_size = {VOCAB * 2} tokens, but target .* has {VOCAB}"):
        check_compatible(heads, model)


def test_model_without_lm_head_is_refused():
    model = tiny_target("llama").base_model  # the decoder alone, no output embedding
    with pytest.raises(ValueError, match="has no output embedding"):
        TargetAdapter(model)
