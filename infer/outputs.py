"""What `LLM.generate` and `LLMEngine.step` return: vLLM's `RequestOutput` / `CompletionOutput`, plus metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a request: the generated part only."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS / length


@dataclass
class RequestMetrics:
    """Per-request speculation and timing statistics.

    A target step is one target forward that produced tokens for this request: its prefill, then one per
    decode / verify step. tau (`mean_tokens_per_step`) is generated tokens per target step: 1 for plain
    decoding, up to 1 + num_speculative_tokens with speculation.
    """

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    target_steps: int = 0
    generated_tokens: int = 0
    tokens_per_step: list[int] = field(default_factory=list)  # tokens each target step emitted (prefill first)
    acceptance_counts: list[int] = field(default_factory=list)  # [d]: steps that accepted >= d + 1 draft tokens
    speculative_steps: int = 0  # decode steps that verified a draft (the rest were plain)

    @property
    def mean_tokens_per_step(self) -> float:
        return self.generated_tokens / self.target_steps if self.target_steps else 0.0

    @property
    def acceptance_rates(self) -> list[float]:
        """Fraction of speculative steps that accepted at least d + 1 draft tokens, per position d."""
        n = self.speculative_steps
        return [c / n if n else 0.0 for c in self.acceptance_counts]

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Generated tokens after the first, per second after the first token."""
        if self.finished_time is None or self.first_token_time is None or self.finished_time <= self.first_token_time:
            return None
        return (self.generated_tokens - 1) / (self.finished_time - self.first_token_time)


@dataclass
class RequestOutput:
    """The state of one request: prompt, completion(s), whether it finished, metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None

    def __repr__(self) -> str:
        out = self.outputs[0] if self.outputs else None
        text = out.text if out else ""
        short = text if len(text) <= 60 else text[:57] + "..."
        reason = out.finish_reason if out else None
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt_tokens={len(self.prompt_token_ids)}, "
            f"text={short!r}, tokens={len(out.token_ids) if out else 0}, finished={self.finished}, finish_reason={reason!r})"
        )
