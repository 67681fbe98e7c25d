"""Tiny random models built from configs, shared by the tests (nothing is downloaded)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 128
HIDDEN = 32


def tiny_target(arch: str = "llama", vocab_size: int = VOCAB, hidden_size: int = HIDDEN, layers: int = 2, seed: int = 0):
    """A frozen random causal LM in float32; 'llama' or 'qwen2'."""
    torch.manual_seed(seed)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
