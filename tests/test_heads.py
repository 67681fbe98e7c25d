"""MLPSpeculator against a float64 reference written from IBM's spec, IBM-format checkpoints, variants, errors."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from speculators import MLPSpeculator, MLPSpeculatorConfig

V, E, D, N = 97, 24, 40, 4


def reference_logits(weights: dict, cfg: dict, state: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
    """float64 MLP speculator straight from the spec, reading IBM's safetensors key names."""
    w = {k: v.double() for k, v in weights.items() if v.is_floating_point()}
    n, tied = cfg["n_predict"], cfg.get("tie_weights", False)
    inner = cfg["inner_dim"] or cfg["emb_dim"]
    state_weight = 0.5 ** (0.5 / n)
    emb_weight = math.sqrt(1 - state_weight**2)

    def rms(x, eps=1e-6):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    rows = inds
    if cfg.get("draft_vocab_size"):
        table = torch.full((cfg["vocab_size"],), cfg["draft_vocab_size"], dtype=torch.long)
        table[weights["speculator.draft_to_target"]] = torch.arange(cfg["draft_vocab_size"])
        rows = table[inds]
    s = state.double()
    if cfg.get("scale_input"):
        s = rms(s) / math.sqrt(2)
    T = state.shape[1]
    out = []
    for i in range(n):
        j = 0 if tied else i
        p = min(i, 1) if tied else i
        z = w[f"speculator.emb.{j}.weight"][rows[:, i : i + T]] * emb_weight * math.sqrt(inner / 2)
        s = s @ w[f"speculator.proj.{p}.weight"].T * state_weight + z
        s = rms(s) * w[f"speculator.ln.{j}.weight"] + w[f"speculator.ln.{j}.bias"]
        s = 0.5 * s * (1 + torch.erf(s / math.sqrt(2)))  # exact GELU
        out.append(s @ w[f"speculator.head.{j}.weight"].T)
    return torch.stack(out)


def ibm_checkpoint(tmp_path, cfg: dict, duplicate_tied: bool = False, seed: int = 0) -> tuple[dict, str]:
    """Write a checkpoint the way IBM's accelerators are laid out, with random weights; return (weights, dir)."""
    g = torch.Generator().manual_seed(seed)
    inner = cfg["inner_dim"] or cfg["emb_dim"]
    n, tied = cfg["n_predict"], cfg.get("tie_weights", False)
    n_shared = 1 if tied and not duplicate_tied else n
    n_proj = 2 if tied and not duplicate_tied else n
    weights = {}
    for i in range(n_shared):
        weights[f"speculator.emb.{i}.weight"] = torch.randn(cfg["vocab_size"], inner, generator=g) * 0.2
        weights[f"speculator.head.{i}.weight"] = torch.randn(cfg["vocab_size"], inner, generator=g) * 0.2
        weights[f"speculator.ln.{i}.weight"] = 1 + 0.1 * torch.randn(inner, generator=g)
        weights[f"speculator.ln.{i}.bias"] = 0.1 * torch.randn(inner, generator=g)
    for i in range(n_proj):
        weights[f"speculator.proj.{i}.weight"] = torch.randn(inner, cfg["emb_dim"] if i == 0 else inner, generator=g) * 0.2
    if duplicate_tied:  # every head's copy holds the same tensor, as a loader that saved per-head keys would
        for kind in ("emb", "head", "ln"):
            for i in range(1, n):
                for suffix in ("weight", "bias") if kind == "ln" else ("weight",):
                    weights[f"speculator.{kind}.{i}.{suffix}"] = weights[f"speculator.{kind}.0.{suffix}"].clone()
        for i in range(2, n):
            weights[f"speculator.proj.{i}.weight"] = weights["speculator.proj.1.weight"].clone()
    directory = tmp_path / "ibm-accelerator"
    directory.mkdir()
    save_file({k: v.half() for k, v in weights.items()}, str(directory / "model.safetensors"))
    config_json = {"architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator", "torch_dtype": "float16",
                   "transformers_version": "4.38.2", **cfg}
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    return {k: v.half().float() for k, v in weights.items()}, str(directory)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_inputs(B=3, T=11, n=N, vocab=V, emb=E, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(B, T, emb, generator=g) * 3, torch.randint(0, vocab, (B, T + n), generator=g)


IBM_VARIANTS = {
    "untied": dict(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=N, top_k_tokens_per_head=[4, 3, 2, 2], n_candidates=5),
    "inner_dim_0": dict(vocab_size=V, emb_dim=E, inner_dim=0, n_predict=3, top_k_tokens_per_head=[5, 4, 3], n_candidates=5),
    "tied_scaled": dict(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=N, top_k_tokens_per_head=[4, 3, 2, 2], n_candidates=5,
                        scale_input=True, tie_weights=True),
}


@pytest.mark.parametrize("variant", sorted(IBM_VARIANTS))
def test_ibm_checkpoint_loads_and_matches_float64_reference(tmp_path, variant):
    cfg = IBM_VARIANTS[variant]
    weights, directory = ibm_checkpoint(tmp_path, cfg)
    heads = MLPSpeculator.from_pretrained(directory, dtype=torch.float32)
    assert heads.config.n_predict == cfg["n_predict"] and heads.config.hidden_size == E
    state, inds = random_inputs(n=cfg["n_predict"])
    ref = reference_logits(weights, cfg, state, inds)
    out = heads(state, inds)
    assert out.shape == (cfg["n_predict"], 3, 11, V)
    assert rel_err(out, ref) < 1e-5


def test_tied_checkpoint_with_per_head_copies_loads(tmp_path):
    cfg = IBM_VARIANTS["tied_scaled"]
    weights, directory = ibm_checkpoint(tmp_path, cfg, duplicate_tied=True)
    heads = MLPSpeculator.from_pretrained(directory, dtype=torch.float32)
    state, inds = random_inputs()
    assert rel_err(heads(state, inds), reference_logits(weights, cfg, state, inds)) < 1e-5


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(tie_weights=True), dict(scale_input=True), dict(draft_vocab_size=31), dict(draft_vocab_size=31, tie_weights=True, scale_input=True)],
    ids=["untied", "tied", "scale_input", "draft_vocab", "draft_vocab_tied_scaled"],
)
def test_variants_match_reference_and_round_trip(tmp_path, extra):
    cfg = dict(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=N, **extra)
    heads = MLPSpeculator(MLPSpeculatorConfig(**cfg))
    if extra.get("draft_vocab_size"):
        heads.set_draft_vocab(torch.randperm(V)[: extra["draft_vocab_size"]])
    state, inds = random_inputs()
    weights = heads.state_dict()
    ref = reference_logits(weights, cfg, state, inds)
    assert rel_err(heads(state, inds), ref) < 1e-5

    heads.save_pretrained(tmp_path / "heads")
    saved = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert saved["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    assert ("draft_vocab_size" in saved) == bool(extra.get("draft_vocab_size"))
    loaded = MLPSpeculator.from_pretrained(tmp_path / "heads")
    assert torch.equal(loaded(state, inds), heads(state, inds))
    if extra.get("draft_vocab_size"):
        assert torch.equal(loaded.draft_to_target, heads.draft_to_target)


def test_state_dict_is_ibm_layout():
    untied = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=3))
    assert sorted(untied.state_dict()) == sorted(
        [f"speculator.{k}.{i}.weight" for k in ("emb", "proj", "head", "ln") for i in range(3)]
        + [f"speculator.ln.{i}.bias" for i in range(3)]
    )
    tied = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=3, tie_weights=True))
    assert sorted(tied.state_dict()) == sorted(
        ["speculator.emb.0.weight", "speculator.head.0.weight", "speculator.ln.0.weight", "speculator.ln.0.bias",
         "speculator.proj.0.weight", "speculator.proj.1.weight"]
    )


def test_bf16_round_trip_keeps_draft_map_integer(tmp_path):
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=2, draft_vocab_size=40))
    heads.set_draft_vocab(torch.arange(57, 97))
    heads.to(torch.bfloat16).save_pretrained(tmp_path / "h")
    loaded = MLPSpeculator.from_pretrained(tmp_path / "h", dtype=torch.bfloat16)
    assert loaded.speculator.head[0].weight.dtype == torch.bfloat16
    assert loaded.draft_to_target.dtype == torch.long and torch.equal(loaded.draft_to_target, torch.arange(57, 97))
    state, inds = random_inputs(n=2)
    out = loaded(state.bfloat16(), inds)
    ref = reference_logits({k: v.float() if v.is_floating_point() else v for k, v in loaded.state_dict().items()},
                           dict(vocab_size=V, emb_dim=E, inner_dim=0, n_predict=2, draft_vocab_size=40), state.bfloat16(), inds)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2


def test_out_of_draft_tokens_share_one_embedding_row():
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=1, draft_vocab_size=10))
    heads.set_draft_vocab(torch.arange(10, 20))
    rows = heads.speculator.target_to_draft(torch.tensor([10, 19, 0, 96]))
    assert rows.tolist() == [0, 9, 10, 10]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_predict=3, top_k_tokens_per_head=[2, 2]), "one entry per head"),
        (dict(n_predict=0), "n_predict must be a positive integer"),
        (dict(n_predict=1, tie_weights=True), "tie_weights needs n_predict >= 2"),
        (dict(inner_dim=-1), "inner_dim must be >= 0"),
        (dict(draft_vocab_size=V + 1), "draft_vocab_size must be 0"),
        (dict(n_predict=2, top_k_tokens_per_head=[0, 1]), "entries must be >= 1"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLPSpeculatorConfig(vocab_size=V, emb_dim=E, **kwargs)


def test_draft_vocab_errors():
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=2, draft_vocab_size=5))
    with pytest.raises(ValueError, match="must list draft_vocab_size = 5"):
        heads.set_draft_vocab([1, 2, 3])
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size = 97\)"):
        heads.set_draft_vocab([1, 2, 3, 4, 97])
    with pytest.raises(ValueError, match="distinct"):
        heads.set_draft_vocab([1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="no draft vocabulary"):
        MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=2)).set_draft_vocab([1])


def test_short_inds_error_names_the_lengths():
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=3))
    with pytest.raises(ValueError, match=r"T \+ n_predict = 5 \+ 3 = 8 tokens per row, got 6"):
        heads(torch.randn(1, 5, E), torch.randint(0, V, (1, 6)))
