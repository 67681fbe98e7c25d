"""`SamplingParams`: how one request is decoded, with vLLM's field names and meanings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

# Temperatures below this are greedy decoding (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What `LLMEngine.step` reports for a request (vLLM's names)."""

    CUMULATIVE = 0  # every step: all text and token ids so far
    DELTA = 1  # every step: only what is new since the last report
    FINAL_ONLY = 2  # once, when the request finishes


@dataclass
class SamplingParams:
    """Sampling parameters of one request (vLLM's `SamplingParams` subset).

    Speculative decoding is lossless for every combination: outputs follow the target's processed
    distribution exactly, and with a seed they are the same tokens plain decoding gives.
    """

    temperature: float = 1.0
    """Softmax temperature; 0 (below 1e-5) means greedy decoding (top_p / top_k are then ignored)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose cumulative probability reaches top_p; 1 keeps all."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    max_tokens: int | None = 16
    """Maximum number of generated tokens; None means up to the context length (max_model_len)."""
    seed: int | None = None
    """Seed of this request's sampling noise; None draws one from the engine's generator. Outputs for a seed do
    not depend on batch composition, speculation, or the tree size."""
    stop: str | list[str] | None = None
    """Stop strings: generation ends when the text contains one; it is not part of the returned text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (kept in token_ids, left out of the text)."""
    ignore_eos: bool = False
    """Keep generating after the model's EOS token(s)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """What `LLMEngine.step` returns for this request; `LLM.generate` uses FINAL_ONLY, `LLM.stream` DELTA."""
    _stop: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise first (vLLM's conventions), then validate with messages that say what was given.
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.stop, str):
            self._stop = [self.stop]
        else:
            self._stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()
        if self.greedy:  # sampling filters mean nothing for the argmax
            self.top_p, self.top_k = 1.0, -1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    def validate(self) -> None:
        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")

        number("temperature", self.temperature)
        number("top_p", self.top_p)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self._stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def clone(self, **changes) -> SamplingParams:
        return replace(self, **changes)
