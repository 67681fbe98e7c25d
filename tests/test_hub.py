"""Model card and Hub upload: with no network the error is clear and local files stay intact."""

import pytest
import torch

from speculators import HubError, MLPSpeculator, MLPSpeculatorConfig, ModelCardInfo
from speculators.hub import model_card, write_model_card


def small_heads(**kw):
    return MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=16, n_predict=3, **kw))


def test_model_card_lists_what_users_ask_for(tmp_path):
    heads = small_heads(draft_vocab_size=32)
    info = ModelCardInfo(target_model="Qwen/Qwen2.5-Coder-1.5B-Instruct", datasets=["sharegpt"], metrics={"tau_humaneval": 3.61})
    card = model_card(heads.config, info, "me/heads")
    assert card.startswith("---\nlibrary_name: mlp-speculators")
    assert "base_model: Qwen/Qwen2.5-Coder-1.5B-Instruct" in card
    assert "| heads (n_predict) | 3 |" in card
    assert "32 most frequent target tokens (of 64)" in card
    assert "| tau_humaneval | 3.610 |" in card
    path = write_model_card(tmp_path, heads.config, info)
    assert path.read_text() == model_card(heads.config, info)
    assert "measured acceptance | not measured" in model_card(small_heads().config, ModelCardInfo())


def test_push_without_network_is_a_clear_error_and_keeps_local_files(tmp_path):
    heads = small_heads()
    heads.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # A closed local port: the connection is refused at once, as on a machine with no network.
    with pytest.raises(HubError, match=r"could not push to the Hugging Face Hub repo 'me/heads'.*saved in"):
        heads.push_to_hub("me/heads", local_dir=tmp_path, endpoint="http://127.0.0.1:9", token="hf_fake")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: v for k, v in after.items() if k != "README.md"} == before
    assert MLPSpeculator.from_pretrained(tmp_path).config.n_predict == 3


def test_push_offline_mode_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="could not push"):
        small_heads().push_to_hub("me/heads", token="hf_fake")
