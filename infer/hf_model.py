"""The fallback target for architectures our own model does not implement: transformers' modeling code.

It runs the same calls as `model.Transformer` (tokens, RoPE positions, cache slots, a boolean mask over the
first S slots), by handing the HF model a custom 4D attention mask, explicit position ids, and a cache whose
layers write each row's K/V at the slots we choose and return the first S slots. Correct for any causal LM
whose attention goes through `Cache.update`; not compiled or graph-captured, so slower than our own model.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, StaticLayer


class SlotLayer(StaticLayer):
    """A static cache layer [slots, H, S_alloc, D] that writes at explicit per-row slots."""

    def __init__(self, owner: SlotCache, max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self.owner = owner

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states: [B, H, T, D] for the rows `owner.rows`, written at `owner.slots` [B, T]
        if not self.is_initialized:
            self.lazy_initialization_full(key_states, value_states)
        rows, slots, S = self.owner.rows, self.owner.slots, self.owner.S
        keys, values = self.keys[rows], self.values[rows]  # views [B, H, S_alloc, D]
        b = torch.arange(slots.size(0), device=slots.device).unsqueeze(1)
        keys[b, :, slots] = key_states.transpose(1, 2).to(keys.dtype)
        values[b, :, slots] = value_states.transpose(1, 2).to(values.dtype)
        return keys[:, :, :S], values[:, :, :S]

    def lazy_initialization_full(self, key_states, value_states):
        """Allocate for all slots (the first call may see fewer rows)."""
        n = self.owner.n_slots
        H, D, Dv = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = torch.zeros(n, H, self.max_cache_len, D, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(n, H, self.max_cache_len, Dv, dtype=value_states.dtype, device=value_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.S, 0


class SlotCache(Cache):
    """One `SlotLayer` per decoder layer; `rows`, `slots` and `S` are set before every forward."""

    def __init__(self, n_layers: int, n_slots: int, max_len: int):
        self.n_slots = n_slots
        self.rows: slice = slice(0, n_slots)
        self.slots: torch.Tensor | None = None
        self.S = max_len
        super().__init__(layers=[SlotLayer(self, max_len) for _ in range(n_layers)])


class HFModel(nn.Module):
    """transformers causal LM behind `model.Transformer`'s interface (forward / logits / compact / setup_cache)."""

    capturable = False  # modeling code may branch on tensor values: never inside a CUDA graph

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = config
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embedding: the target must be a causal LM")
        self._hidden: torch.Tensor | None = None
        head.register_forward_pre_hook(self._capture)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        self.cache: SlotCache | None = None

    def _capture(self, module, args):
        self._hidden = args[0]

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.model.get_output_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    def setup_cache(self, n_slots: int, max_len: int) -> None:
        n_layers = self.config.num_hidden_layers
        self.cache = SlotCache(n_layers, n_slots, max_len)
        self.max_len = max_len

    def forward(self, tokens, pos, slots, mask, rows: slice, S: int, logits: str = "all"):
        """(hidden [B, T, E], logits [B, T or 1, V] or None); see `model.Transformer.forward`."""
        cache = self.cache
        cache.rows, cache.slots, cache.S = rows, slots, S
        dtype = self.dtype
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        kwargs = {self._cache_kwarg: cache}
        if logits == "last" and self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        self._hidden = None
        out = self.model(input_ids=tokens, position_ids=pos, attention_mask=additive, use_cache=True, **kwargs)
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError(f"{type(self.model).__name__}'s forward did not call its output embedding")
        if logits is None:
            return hidden, None
        out_logits = out.logits
        if logits == "last":
            out_logits, hidden = out_logits[:, -1:], hidden
        return hidden, out_logits

    def compact(self, rows: slice, src: torch.Tensor, dst: torch.Tensor) -> None:
        b = torch.arange(src.size(0), device=src.device).unsqueeze(1)
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            for buf in (layer.keys, layer.values):
                view = buf[rows]
                view[b, :, dst] = view[b, :, src]


def check_supported(config, max_model_len: int | None) -> None:
    """The one custom 4D mask we pass serves every layer: sliding-window layers would see too much."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and (max_model_len is None or max_model_len > window):
        raise ValueError(
            f"{getattr(config, 'model_type', 'this model')} uses sliding-window attention (window {window}), which the "
            f"runtime does not implement: pass max_model_len <= {window} (got {max_model_len}) so the window never applies"
        )


def load_hf_model(path, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None) -> HFModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    check_supported(AutoConfig.from_pretrained(str(path)), max_model_len)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return HFModel(model.to(device).eval().requires_grad_(False))
