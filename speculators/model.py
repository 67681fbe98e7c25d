"""`MLPSpeculator`: IBM's MLP speculator heads (arXiv 2404.19124) as a transformers `PreTrainedModel`.

Head i reads the running state (the target's final-norm hidden state for i = 0) and the token chosen one
position earlier, and predicts the token after it:

    z      = emb_i(token) * emb_weight * sqrt(inner_dim / 2)
    state  = GELU(ln_i(proj_i(state) * state_weight + z))
    logits = head_i(state)

with state_weight = 0.5 ** (0.5 / n_predict), emb_weight = sqrt(1 - state_weight ** 2), and ln_i an RMS norm
(no mean subtraction, eps 1e-6) with learned weight and bias. The module tree (`speculator.emb.{i}`,
`speculator.proj.{i}`, `speculator.head.{i}`, `speculator.ln.{i}`) is the safetensors layout of IBM's
checkpoints, so `from_pretrained` loads them and `save_pretrained` writes what vLLM serves.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init

from speculators.config import MLPSpeculatorConfig


class SpeculatorLayerNorm(nn.Module):
    """RMS norm without mean subtraction, with optional learned weight and bias (IBM's LayerNormParameterized).

    The mean of squares is taken in float32 whatever the input dtype: same function, better numerics in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if self.weight is not None:
            x = x * self.weight + self.bias
        return x


class SpeculatorHeads(nn.Module):
    """The chained heads themselves; `MLPSpeculator` wraps them under the `speculator.` prefix.

    With `tie_weights` the module lists hold only the shared modules (emb/head/ln: one, proj: two), so the
    state dict lists each tensor once; `module_index` maps a head to its module.
    With a draft vocabulary, emb tables have one extra row (index `draft_vocab_size`) shared by every target
    token outside the draft vocabulary, and heads score draft ids; `draft_to_target` maps them back.
    """

    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__()
        self.n_predict = config.n_predict
        self.tie_weights = config.tie_weights
        self.scale_input = config.scale_input
        self.inner_dim = config.effective_inner_dim
        self.vocab_size = config.vocab_size
        self.draft_vocab_size = config.draft_vocab_size
        D, E = self.inner_dim, config.emb_dim
        V_out = config.head_vocab_size
        V_in = V_out + 1 if config.draft_vocab_size else V_out

        n_shared = 1 if config.tie_weights else config.n_predict
        n_proj = min(2, config.n_predict) if config.tie_weights else config.n_predict
        self.emb = nn.ModuleList([nn.Embedding(V_in, D) for _ in range(n_shared)])
        self.proj = nn.ModuleList([nn.Linear(E if i == 0 else D, D, bias=False) for i in range(n_proj)])
        self.head = nn.ModuleList([nn.Linear(D, V_out, bias=False) for _ in range(n_shared)])
        self.ln = nn.ModuleList([SpeculatorLayerNorm(D) for _ in range(n_shared)])
        self.ln0 = SpeculatorLayerNorm(E, affine=False) if config.scale_input else None
        if config.draft_vocab_size:
            self.register_buffer("draft_to_target", torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_to_target = None

        # Weights make state_0 account for half of the state's magnitude by the last head, in expectation.
        self.state_weight = 0.5 ** (0.5 / config.n_predict)
        self.emb_weight = math.sqrt(1 - self.state_weight**2)
        self.emb_scale = self.emb_weight * math.sqrt(D / 2)

    def module_index(self, i: int, kind: str) -> int:
        """Index into `self.emb/head/ln` ("shared") or `self.proj` ("proj") for head i."""
        if not self.tie_weights:
            return i
        return min(i, 1) if kind == "proj" else 0

    def target_to_draft(self, ids: torch.Tensor) -> torch.Tensor:
        """Map target token ids to embedding rows: draft ids, or the shared out-of-draft row."""
        if self.draft_to_target is None:
            return ids
        N = self.draft_vocab_size
        table = torch.full((self.vocab_size,), N, dtype=torch.long, device=ids.device)
        table[self.draft_to_target] = torch.arange(N, device=ids.device)
        return table[ids]

    def prepare_state(self, state: torch.Tensor) -> torch.Tensor:
        """The target state as head 0 reads it (cast to the heads' dtype, scaled if `scale_input`)."""
        state = state.to(self.proj[0].weight.dtype)
        if self.ln0 is not None:
            state = self.ln0(state) / math.sqrt(2)
        return state

    def step(self, i: int, state: torch.Tensor, emb_rows: torch.Tensor) -> torch.Tensor:
        """Head i's new state from the previous state [..., E or D] and embedding rows [...]: [..., D]."""
        s, p = self.module_index(i, "shared"), self.module_index(i, "proj")
        z = self.emb[s](emb_rows) * self.emb_scale
        state = self.proj[p](state) * self.state_weight + z
        return F.gelu(self.ln[s](state))

    def logits(self, i: int, state: torch.Tensor) -> torch.Tensor:
        """Head i's logits over the head vocabulary from its state."""
        return self.head[self.module_index(i, "shared")](state)

    def states(self, state: torch.Tensor, inds: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced states of every head.

        state: [B, T, E] target final-norm hidden states; inds: [B, T + n_predict] target token ids where
        head i reads inds[:, i : i + T]. Returns n_predict tensors [B, T, D]. Training applies the output
        layers itself (chunked, fused with the loss), so the full logits never exist at once.
        """
        T = state.size(1)
        if inds.size(1) < T + self.n_predict:
            raise ValueError(
                f"inds needs T + n_predict = {T} + {self.n_predict} = {T + self.n_predict} tokens per row, "
                f"got {inds.size(1)}"
            )
        rows = self.target_to_draft(inds)
        state = self.prepare_state(state)
        out = []
        for i in range(self.n_predict):
            state = self.step(i, state, rows[:, i : i + T])
            out.append(state)
        return out

    def forward(self, state: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
        """Logits [n_predict, B, T, head_vocab] for state [B, T, E] and inds [B, T + n_predict]."""
        return torch.stack([self.logits(i, s) for i, s in enumerate(self.states(state, inds))])


class MLPSpeculatorPreTrainedModel(PreTrainedModel):
    """MLP speculator heads with transformers' `from_pretrained` / `save_pretrained` / `push_to_hub`.

    Named as IBM's class because `save_pretrained` writes the class name into config.json's
    `architectures`, which is what vLLM looks up; `MLPSpeculator` is the name to use in code.

        heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=H, n_predict=4))
        logits = heads(hidden_states, token_ids)   # [n_predict, B, T, V]
    """

    config_class = MLPSpeculatorConfig
    base_model_prefix = "speculator"
    main_input_name = "state"
    _no_split_modules = []
    # Some tied IBM checkpoints may list every head's copy of a shared tensor: the copies are the same weights.
    _keys_to_ignore_on_load_unexpected = [r"^speculator\.(emb|head|ln)\.[1-9]\d*\.", r"^speculator\.proj\.([2-9]|[1-9]\d+)\."]

    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__(config)
        self.speculator = SpeculatorHeads(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # IBM's reset_parameters: truncated normal with std 1/sqrt(inner_dim), norms at identity.
        std = 1 / math.sqrt(self.config.effective_inner_dim)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SpeculatorLayerNorm) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @property
    def n_predict(self) -> int:
        return self.config.n_predict

    @property
    def draft_to_target(self) -> torch.Tensor | None:
        """[draft_vocab_size] target id of each draft id, or None when the heads score the full vocabulary."""
        return self.speculator.draft_to_target

    def set_draft_vocab(self, target_ids: torch.Tensor | list[int]) -> None:
        """Set which target tokens the heads score (length draft_vocab_size, distinct, in range)."""
        ids = torch.as_tensor(target_ids, dtype=torch.long)
        N, V = self.config.draft_vocab_size, self.config.vocab_size
        if not N:
            raise ValueError("these heads have no draft vocabulary (config.draft_vocab_size = 0)")
        if ids.shape != (N,):
            raise ValueError(f"draft vocabulary must list draft_vocab_size = {N} target ids, got shape {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"draft vocabulary ids must lie in [0, vocab_size = {V}), got range [{ids.min()}, {ids.max()}]")
        if ids.unique().numel() != N:
            raise ValueError("draft vocabulary ids must be distinct")
        self.speculator.draft_to_target.copy_(ids.to(self.speculator.draft_to_target.device))

    def forward(self, state: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
        """Logits [n_predict, B, T, V'] (V' = draft vocab size if any, else vocab_size).

        state: [B, T, emb_dim] the target's final-norm hidden states; inds: [B, T + n_predict] target token
        ids, head i reading inds[:, i : i + T] (inds[:, t] is the token that follows position t).
        """
        return self.speculator(state, inds)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload to the Hub with a model card; see `speculators.hub.push_heads_to_hub` for the arguments."""
        from speculators.hub import push_heads_to_hub

        return push_heads_to_hub(self, repo_id, **kwargs)


MLPSpeculator = MLPSpeculatorPreTrainedModel
