"""Our own decoder for the Llama / Qwen2 / Mistral family, gpt-fast style, loading HF safetensors directly.

One forward serves prefill, plain decoding and tree verification: every call says, per row, which tokens go
in (`tokens [B, T]`), at which RoPE positions (`pos [B, T]`), into which KV cache slots (`slots [B, T]`),
and what each query may attend to (`mask [B, 1, T, S]` over the first S cache slots). A tree's nodes are
then written at slots seq_len + node and rotated at seq_len + depth; the accepted path is compacted later
with one index copy over all layers (the cache is one stacked buffer).

The numerics follow transformers' Llama code (RMSNorm in float32, RoPE tables in float32 cast to the model
dtype, residual stream in the model dtype), so greedy outputs match HF's. Speed: q/k/v and gate/up are one
matmul each, GQA is folded into the query length (no K/V copies), and `TransformerBlock.forward` is the unit
that the engine compiles (`cuda_graphs.compiled`): one compiled artifact serves all 28-80 layers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from speculators.infer.gemv import Linear

ARCHITECTURES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # position-independent ones: a static table


class Unsupported(ValueError):
    """This checkpoint needs something our model does not implement; the HF fallback serves it."""


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"
    hf_config: object = None  # transformers config, read by the non-default RoPE initialisers

    @classmethod
    def from_hf(cls, config, max_model_len: int | None = None) -> ModelArgs:
        """Args from a transformers config; raises `Unsupported` (with the reason) for anything we do not model."""
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise Unsupported(f"model_type {model_type!r} is not one of {ARCHITECTURES}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise Unsupported(f"hidden_act {config.hidden_act!r}")
        if getattr(config, "mlp_bias", False):
            raise Unsupported("mlp_bias")
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
        if window and uses_window and (max_model_len is None or max_model_len > window):
            raise Unsupported(f"sliding_window {window} < max_model_len {max_model_len}")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope and not isinstance(rope.get("rope_type", rope.get("type", "default")), str):
            raise Unsupported("per-layer RoPE parameters")
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise Unsupported(f"rope_type {rope_type!r}")
        if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
            raise Unsupported("partial_rotary_factor")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        n_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            intermediate_size=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_theta=float(theta),
            rope_type=rope_type,
            hf_config=config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [head_dim / 2] in float32, attention scaling), exactly as transformers computes them."""
        if self.rope_type == "default":
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / (self.rope_theta**exponent), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D] in x's dtype
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split = [q, kv, kv]
        self.wqkv = Linear(args.dim, q + 2 * kv, bias=args.qkv_bias)
        self.wo = Linear(q, args.dim, bias=args.o_bias)

    def forward(self, x, cos, sin, mask, slots, k_cache, v_cache):
        # x: [B, T, E]; mask: [B, 1, G * T, S] additive (GQA group folded into the query length); slots: [B, T]
        # k_cache, v_cache: [B, H_kv, S, D] views of this layer's cache rows
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        rows = torch.arange(B, device=x.device).unsqueeze(1)  # [B, 1]
        k_cache[rows, :, slots] = k.transpose(1, 2)  # indexed view: [B, T, Hkv, D]
        v_cache[rows, :, slots] = v.view(B, T, Hkv, D)
        # Query head h reads kv head h // G: fold the G query heads of a kv head into the query length.
        q = q.reshape(B, Hkv, (H // Hkv) * T, D)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # [B, Hkv, G * T, D]
        return self.wo(y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """One layer. Takes (delta, residual) and returns the next pair, so that the residual add of one layer
    and the norm of the next are one fused kernel when compiled (vLLM's fused add-norm)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, delta, residual, cos, sin, mask, slots, k_cache, v_cache):
        residual = residual + delta  # [B, T, E]
        h = residual + self.attention(self.attention_norm(residual), cos, sin, mask, slots, k_cache, v_cache)
        return self.feed_forward(self.ffn_norm(h)), h


class Transformer(nn.Module):
    """The decoder with a static, stacked KV cache `kv [L, 2, slots, H_kv, S_alloc, D]`."""

    capturable = True  # no syncs or value-dependent branches in forward: CUDA graphs may capture it

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.kv: torch.Tensor | None = None
        # The three pieces of a forward; the engine swaps in compiled versions on CUDA (cuda_graphs.compiled).
        self.prologue, self.block, self.epilogue = self._prologue, self._block, self._epilogue

    @property
    def hidden_size(self) -> int:
        return self.args.dim

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @staticmethod
    def _block(layer, *args):
        return layer(*args)

    def setup_cache(self, n_slots: int, max_len: int) -> None:
        """Allocate the KV cache for n_slots sequences of max_len slots, and the RoPE tables."""
        a, p = self.args, self.output.weight
        self.kv = torch.zeros(a.n_layers, 2, n_slots, a.n_kv_heads, max_len, a.head_dim, dtype=p.dtype, device=p.device)
        inv_freq, scaling = a.rope_inv_freq()
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [S, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(p.device)  # [S, D] float32, cast per call like transformers
        self.sin = (emb.sin() * scaling).to(p.device)

    def forward(self, tokens, pos, slots, mask, rows: slice, S: int, logits: str | None = "all"):
        """(final-norm hidden states [B, T, E], logits [B, T, V] ("all"), [B, 1, V] ("last") or None).

        tokens, pos, slots: [B, T]; mask: [B, 1, T, S] bool over cache slots [0, S) of rows `rows` (a slice of
        the cache's slots, B long). Writes every token's K/V at its slot first, then attends.
        """
        G = self.args.n_heads // self.args.n_kv_heads
        residual, delta, cos, sin, mask = self.prologue(self.tok_embeddings, self.cos, self.sin, tokens, pos, mask, G)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = self.kv[i, 0, rows, :, :S], self.kv[i, 1, rows, :, :S]
            delta, residual = self.block(layer, delta, residual, cos, sin, mask, slots, k_cache, v_cache)
        hidden = self.epilogue(self.norm, residual, delta)
        if logits is None:
            return hidden, None
        return hidden, self.output(hidden if logits == "all" else hidden[:, -1:])

    @staticmethod
    def _prologue(embeddings, cos_table, sin_table, tokens, pos, mask, G: int):
        """Embeddings, a zero delta, RoPE rows [B, 1, T, D] and the additive mask [B, 1, G * T, S], made once
        per forward rather than in every layer."""
        residual = embeddings(tokens)  # [B, T, E]
        dtype = residual.dtype
        B, _, T, S = mask.shape
        bias = torch.zeros(B, 1, T, S, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        bias = bias.unsqueeze(2).expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        cos = cos_table[pos].to(dtype).unsqueeze(1)
        sin = sin_table[pos].to(dtype).unsqueeze(1)
        return residual, torch.zeros_like(residual), cos, sin, bias

    @staticmethod
    def _epilogue(norm, residual, delta):
        return norm(residual + delta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)

    def compact(self, rows: slice, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move the K/V of cache slots src [B, n] to dst [B, n], for every layer at once."""
        B = src.size(0)
        kv = self.kv[:, :, rows]  # [L, 2, B, H, S, D]
        b = torch.arange(B, device=src.device).unsqueeze(1)
        kv[:, :, b, :, dst] = kv[:, :, b, :, src]  # gathered first, then written: overlaps are safe


# ---- loading -------------------------------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory, or a Hub snapshot downloaded (or found in the cache) for a hub id."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    return Path(snapshot_download(name_or_path, allow_patterns=patterns))


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Unsupported(f"no safetensors weights in {path}")
    return files


def hf_weight_map(args: ModelArgs) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensors concatenated (along dim 0) to make it."""
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_embeddings:
        m["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layers):
        hf, our = f"model.layers.{i}.", f"layers.{i}."
        m[our + "attention.wqkv.weight"] = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        if args.qkv_bias:
            m[our + "attention.wqkv.bias"] = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
        m[our + "attention.wo.weight"] = [hf + "self_attn.o_proj.weight"]
        if args.o_bias:
            m[our + "attention.wo.bias"] = [hf + "self_attn.o_proj.bias"]
        m[our + "feed_forward.w13.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        m[our + "feed_forward.w2.weight"] = [hf + "mlp.down_proj.weight"]
        m[our + "attention_norm.weight"] = [hf + "input_layernorm.weight"]
        m[our + "ffn_norm.weight"] = [hf + "post_attention_layernorm.weight"]
    return m


def load_model(path: str | os.PathLike, config, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None) -> Transformer:
    """Build our Transformer for an HF checkpoint directory and load its safetensors; `Unsupported` if we cannot."""
    from safetensors import safe_open

    args = ModelArgs.from_hf(config, max_model_len)
    path = Path(path)
    files = safetensors_files(path)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    wanted = hf_weight_map(args)
    needed = {name for names in wanted.values() for name in names}
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in needed:
                    found[key] = f.get_tensor(key)
    return _fill(model, found)


def _fill(model: Transformer, found: dict[str, torch.Tensor]) -> Transformer:
    """Copy HF tensors (by HF name) into the model's parameters, fusing q/k/v and gate/up."""
    wanted = hf_weight_map(model.args)
    missing = sorted({n for names in wanted.values() for n in names} - found.keys())
    if missing:
        raise Unsupported(f"checkpoint lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in wanted.items():
            tensor = torch.cat([found[n] for n in theirs], dim=0) if len(theirs) > 1 else found[theirs[0]]
            if tensor.shape != params[ours].shape:
                raise Unsupported(f"{theirs[0]} has shape {tuple(tensor.shape)}, expected {tuple(params[ours].shape)}")
            params[ours].copy_(tensor)
    return model.eval().requires_grad_(False)


def from_hf_model(hf_model: nn.Module, max_model_len: int | None = None) -> Transformer:
    """Our Transformer with the weights of an in-memory transformers model (same device and dtype)."""
    args = ModelArgs.from_hf(hf_model.config, max_model_len)
    p = next(hf_model.parameters())
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=p.device).to(p.dtype)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return _fill(model, dict(hf_model.state_dict()))


def random_model(args: ModelArgs, dtype: torch.dtype, device: torch.device, std: float = 0.02, seed: int = 0) -> Transformer:
    """A random-weight model (benchmarks: the speed of a shape needs no checkpoint)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std / math.sqrt(1.0))
    return model.eval().requires_grad_(False)
