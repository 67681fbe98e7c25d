"""The target adapter: the final-norm hidden states and the logits of any HF causal LM, from one forward.

The heads read the state the target's output layer reads. Rather than knowing where each architecture
keeps its final norm (Llama `model.norm`, GPT-2 `transformer.ln_f`, ...), we capture the input of the
output embedding with a forward pre-hook: one full forward gives both tensors, nothing else is
materialised (no `output_hidden_states`), post-head transforms (Granite's logit scaling, Gemma's
soft-capping) stay the model's own, and wrappers that hook the root module (FSDP2, ZeRO-3) still run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from speculators.config import MLPSpeculatorConfig


@dataclass
class TargetOutput:
    hidden_states: torch.Tensor  # [B, T, H] final-norm hidden states (what the lm_head reads)
    logits: torch.Tensor  # [B, T, V]


class TargetAdapter:
    """Wraps a frozen HF causal LM; `adapter(input_ids, attention_mask)` returns a `TargetOutput`."""

    def __init__(self, model: nn.Module):
        self.model = model
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is None:
            raise ValueError(
                f"{type(model).__name__} has no output embedding (get_output_embeddings() is None): "
                "the target must be a causal LM with an lm_head (AutoModelForCausalLM)"
            )
        self._captured: torch.Tensor | None = None
        lm_head.register_forward_pre_hook(self._capture)
        self.hidden_size, self.vocab_size = target_dims(model)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> TargetOutput:
        """input_ids: [B, T]. Extra kwargs (position_ids, logits_to_keep, ...) go to the model's forward."""
        self._captured = None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        hidden, self._captured = self._captured, None
        if hidden is None:
            raise RuntimeError(f"{type(self.model).__name__}'s forward did not call its output embedding")
        return TargetOutput(hidden_states=hidden, logits=out.logits)


def target_dims(model: nn.Module) -> tuple[int, int]:
    """(final hidden size, vocabulary size) of a causal LM: the shape of what its lm_head maps.

    Read from the config, since sharded weights (FSDP2, ZeRO-3) do not show their full shape; the lm_head's
    own shape decides where the config has no such field.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None)
    vocab = getattr(config, "vocab_size", None)
    if hidden is None or vocab is None:
        weight = model.get_output_embeddings().weight
        shape = getattr(weight, "ds_shape", None) or weight.shape  # DeepSpeed ZeRO-3 keeps the full shape apart
        vocab, hidden = int(shape[0]), int(shape[1])
    return int(hidden), int(vocab)


def check_compatible(heads_config: MLPSpeculatorConfig, model: nn.Module) -> None:
    """Raise a ValueError naming both numbers when heads and target do not fit together."""
    hidden, vocab = target_dims(model)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if heads_config.emb_dim != hidden:
        raise ValueError(
            f"speculator heads expect the target's hidden size to be emb_dim = {heads_config.emb_dim}, "
            f"but target {name} has hidden size {hidden}"
        )
    if heads_config.vocab_size != vocab:
        raise ValueError(
            f"speculator heads were built for a vocabulary of vocab_size = {heads_config.vocab_size} tokens, "
            f"but target {name} has {vocab}"
        )


def load_target(name_or_path: str, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device | None = None, **kwargs) -> nn.Module:
    """A frozen causal LM (local dir or hub id): eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model
