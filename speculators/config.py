"""`MLPSpeculatorConfig`: the config of IBM's MLP speculator ("accelerator") checkpoints.

Field names and meanings match IBM's `config.json` (fms-extras, vLLM's `MLPSpeculatorConfig`), so existing
`ibm-ai-platform/*-accelerator` checkpoints load unchanged and what we write loads where `mlp_speculator`
checkpoints are served. The one addition, `draft_vocab_size`, is written only when it is used.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def default_top_k_tokens_per_head(n_predict: int) -> list[int]:
    """5, 4, 3, ... candidates per head (at least 1): vLLM's default [5, 4, 3] for three heads, extended."""
    return [max(1, 5 - i) for i in range(n_predict)]


class MLPSpeculatorConfig(PretrainedConfig):
    """Config of a chain of `n_predict` MLP speculator heads.

    Args:
        vocab_size: the target model's vocabulary size (rows of its lm_head). Token ids the heads read
            and propose are target ids.
        emb_dim: the target's final hidden size, the width of the state the first head reads.
            `hidden_size` is an alias.
        inner_dim: the heads' own width; 0 means `emb_dim`.
        n_predict: number of heads, i.e. tokens proposed beyond the target's own next token.
        top_k_tokens_per_head: candidate tree shape: head i expands every branch into its top-k tokens.
            None means `default_top_k_tokens_per_head(n_predict)`.
        n_candidates: how many of the tree's highest-scoring root-to-leaf paths are verified.
        scale_input: RMS-normalise (no parameters) the target state and divide it by sqrt(2) first.
        tie_weights: share emb, head and ln across heads and proj[1:] among themselves (proj[0] maps
            from emb_dim and stays separate).
        draft_vocab_size: 0 (IBM's format) predicts over the whole target vocabulary. N > 0 predicts
            over N target tokens (usually the most frequent), listed in the checkpoint's
            `speculator.draft_to_target` buffer; with today's 128k-262k vocabularies the heads' output
            layers otherwise move as many bytes per step as a large share of the target.
    """

    model_type = "mlp_speculator"
    attribute_map = {"hidden_size": "emb_dim"}

    def __init__(
        self,
        vocab_size: int = 32000,
        emb_dim: int = 4096,
        inner_dim: int = 0,
        n_predict: int = 3,
        top_k_tokens_per_head: list[int] | None = None,
        n_candidates: int = 5,
        scale_input: bool = False,
        tie_weights: bool = False,
        draft_vocab_size: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.emb_dim = emb_dim
        self.inner_dim = inner_dim
        self.n_predict = n_predict
        self.top_k_tokens_per_head = (
            list(top_k_tokens_per_head)
            if top_k_tokens_per_head is not None
            else default_top_k_tokens_per_head(n_predict)
        )
        self.n_candidates = n_candidates
        self.scale_input = scale_input
        self.tie_weights = tie_weights
        self.draft_vocab_size = draft_vocab_size
        super().__init__(**kwargs)
        self.validate()

    @property
    def effective_inner_dim(self) -> int:
        """The heads' width with IBM's 0-means-emb_dim rule applied."""
        return self.inner_dim or self.emb_dim

    @property
    def head_vocab_size(self) -> int:
        """Size of the vocabulary the heads score: the draft vocabulary when there is one."""
        return self.draft_vocab_size or self.vocab_size

    def validate(self) -> None:
        """Reject configs that would build heads IBM's semantics do not define, naming the field."""
        for name in ("vocab_size", "emb_dim", "n_predict", "n_candidates"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPSpeculatorConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.inner_dim, int) or self.inner_dim < 0:
            raise ValueError(f"MLPSpeculatorConfig.inner_dim must be >= 0 (0 means emb_dim), got {self.inner_dim!r}")
        if len(self.top_k_tokens_per_head) != self.n_predict:
            raise ValueError(
                f"MLPSpeculatorConfig.top_k_tokens_per_head needs one entry per head (n_predict={self.n_predict}), "
                f"got {self.top_k_tokens_per_head}"
            )
        if any(not isinstance(k, int) or k < 1 for k in self.top_k_tokens_per_head):
            raise ValueError(f"MLPSpeculatorConfig.top_k_tokens_per_head entries must be >= 1, got {self.top_k_tokens_per_head}")
        if self.tie_weights and self.n_predict < 2:
            raise ValueError(f"MLPSpeculatorConfig.tie_weights needs n_predict >= 2 (nothing to tie), got n_predict={self.n_predict}")
        if not isinstance(self.draft_vocab_size, int) or not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"MLPSpeculatorConfig.draft_vocab_size must be 0 (full vocabulary) or 1..vocab_size={self.vocab_size}, "
                f"got {self.draft_vocab_size!r}"
            )

    def to_dict(self) -> dict:
        # Without a draft vocabulary the config.json stays exactly IBM's: no key other readers do not know.
        out = super().to_dict()
        if not out.get("draft_vocab_size"):
            out.pop("draft_vocab_size", None)
        return out
