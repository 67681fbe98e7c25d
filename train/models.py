"""Building the run's models: the frozen target (a checkpoint or a random one), its tokenizer, and the heads."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from speculators import MLPSpeculator, MLPSpeculatorConfig, check_compatible
from speculators.train.config import ConfigError, TrainConfig

RANDOM_TARGET_DEFAULTS = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def target_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.target_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.target_dtype)


def random_target(arch: str, overrides: dict, dtype: torch.dtype, seed: int = 1234, sharded: bool = False) -> nn.Module:
    """A random-weight causal LM from a config.

    Replicated (default): the same weights on every process (fixed seed, CPU init). Sharded: no process holds the
    whole model. The parameters stay on the meta device (buffers, such as rotary tables, are real) for
    `init_sharded_random` to fill after FSDP2 has sharded them; under a live ZeRO-3 config the model is built
    inside deepspeed.zero.Init instead (transformers does that), partitioned as it is constructed.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    unknown = set(overrides) - set(config_class().to_dict())
    if unknown:
        raise ConfigError(f"target_config has keys {sorted(unknown)} that {config_class.__name__} does not know")
    config = config_class(**{**RANDOM_TARGET_DEFAULTS, **overrides})
    if sharded:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    fork = torch.random.fork_rng(devices=[])
    with fork, _outside_zero3_init():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@torch.no_grad()
def init_sharded_random(model: nn.Module, device: torch.device, seed: int, rank: int) -> None:
    """Give a sharded model built on the meta device (random_target(sharded=True), then fully_shard) its weights,
    shard by shard on `device`: matrices ~ N(0, initializer_range), norm weights 1, biases 0 (transformers' own
    init), each rank's shards from its own seed. Real buffers (rotary tables) are kept."""
    buffers = {name: b for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        getattr(model.get_submodule(owner) if owner else model, leaf).copy_(b)
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(seed + 7919 * rank)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if p.dim() >= 2:
            local.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            local.zero_()
        else:
            local.fill_(1.0)


@contextlib.contextmanager
def _outside_zero3_init():
    """Models built here are built whole, even while a ZeRO-3 config is alive (train/parallel.py load_target).

    There, transformers builds every model inside `deepspeed.zero.Init` (partitioned as constructed) and then
    initialises the weights module by module, gathered: other random draws than a plain build, so a random target
    would differ from the one every other backend builds from the same seed. The random targets are small; built
    whole, `deepspeed.initialize` partitions them like any module built outside zero.Init.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()  # is_deepspeed_zero3_enabled() is False while set to None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def build_target(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen target in eval mode with no gradients, on CPU (placement is the parallel layer's job)."""
    dtype = dtype or target_dtype(cfg, device)
    if cfg.target.startswith("random:"):
        sharded = cfg.random_target_init == "sharded"
        model = random_target(cfg.target.split(":", 1)[1], cfg.target_config, dtype, sharded=sharded)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=dtype, **kwargs)
    return model.eval().requires_grad_(False)


def byte_tokenizer():
    """A byte-level tokenizer (pad 0, bos 1, eos 2, then the 256 bytes) with a minimal chat template.

    Random targets have no tokenizer of their own; this one needs no download and covers any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", chat_template=template
    )


def build_tokenizer(cfg: TrainConfig):
    if cfg.tokenizer == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.target
    if source.startswith("random:"):
        raise ConfigError("a random target has no tokenizer: set `tokenizer: bytes` (or a tokenizer directory / hub id)")
    return AutoTokenizer.from_pretrained(source)


def build_heads(cfg: TrainConfig, target: nn.Module) -> MLPSpeculator:
    """Heads sized to the target (random init seeded by cfg.seed, or `init_heads`), in fp32."""
    from speculators.target import target_dims

    hidden, vocab = target_dims(target)
    if cfg.init_heads:
        heads = MLPSpeculator.from_pretrained(cfg.init_heads, dtype=torch.float32)
        check_compatible(heads.config, target)
        return heads
    if cfg.draft_vocab_size > vocab:
        raise ConfigError(f"draft_vocab_size = {cfg.draft_vocab_size} exceeds the target's vocabulary ({vocab})")
    config = MLPSpeculatorConfig(
        vocab_size=vocab, emb_dim=hidden, inner_dim=cfg.inner_dim, n_predict=cfg.n_predict,
        top_k_tokens_per_head=cfg.resolved_top_k, n_candidates=cfg.n_candidates, scale_input=cfg.scale_input,
        tie_weights=cfg.tie_weights, draft_vocab_size=cfg.draft_vocab_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = MLPSpeculator(config)
    return heads.float()


def eos_ids(tokenizer, target: nn.Module) -> list[int]:
    """Every id that ends a sequence for this target (tokenizer's EOS and the generation config's)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(target, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)
