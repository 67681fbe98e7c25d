"""OpenAI's HTTP API as `speculators serve` speaks it: request bodies (pydantic), response, chunk and error bodies.

Field names and defaults are OpenAI's; a few of vLLM's extensions are accepted too (`top_k`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`). Responses carry one extra field,
`speculative`: the request's speculation statistics (target steps, tau, acceptance rate per draft position).

Requests parse in pydantic's strict mode, so `"temperature": "0.5"` or `"stream": "yes"` is a 400 rather than a
guess. Fields OpenAI defines but this server does not implement are accepted only at values that change nothing
(`UNSUPPORTED`); unknown fields are ignored with a warning, as vLLM does.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from speculators.infer.outputs import RequestMetrics
from speculators.infer.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# OpenAI's default for /v1/completions; chat completions default to the rest of the context (max_model_len).
DEFAULT_COMPLETION_MAX_TOKENS = 16

# field -> values that mean "off", the only ones accepted.
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}
_warned: set[str] = set()


class OpenAIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- requests ------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    """Send a last chunk with `usage` (and no choices) before [DONE]."""


class _Request(BaseModel):
    """What completions and chat completions share: the model, sampling, stop conditions, streaming."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    """A served model name; None means the (first) served one."""
    temperature: float | None = None
    """None means 1.0 (OpenAI's default); 0 is greedy decoding."""
    top_p: float | None = None
    """None means 1.0 (off)."""
    top_k: int | None = None
    """vLLM's extension; None, 0 or -1 mean off."""
    max_tokens: int | None = None
    """None: 16 for completions, the rest of the context for chat (OpenAI's defaults)."""
    n: int = 1
    """Completions per prompt: only 1."""
    stop: str | list[str] | None = None
    seed: int | None = None
    """Seeded sampling gives the same tokens whatever else is in the batch."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def check(self) -> None:
        """Refuse what this server does not do, naming the field (400)."""
        if self.n != 1:
            raise OpenAIError(f"n must be 1: this server returns one completion per request, got n={self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in UNSUPPORTED:
                if value not in UNSUPPORTED[name]:
                    raise OpenAIError(f"{name} is not supported by this server, got {value!r}", param=name)
            elif name not in _warned:
                _warned.add(name)
                logger.warning("ignoring request field %r: this server does not use it", name)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """SamplingParams for the engine (always DELTA outputs); its validation messages become 400s."""
        max_tokens = self.max_new_tokens()
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as err:
            # SamplingParams messages start with the field's name: "top_p must be in (0, 1], got 2".
            field = str(err).split(" ", 1)[0]
            raise OpenAIError(str(err), param=field if field in type(self).model_fields else None) from err


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    """One prompt: a string or token ids (a list of one of them is accepted too)."""

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise OpenAIError(f"one prompt per request is supported, got a list of {len(p)}", param="prompt")
            p = p[0]
        if len(p) == 0:
            raise OpenAIError("the prompt is empty", param="prompt")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content as one string."""
        content = self.content
        if isinstance(content, list):
            kinds = sorted({p.type for p in content if p.type != "text"})
            if kinds:
                raise OpenAIError(f"content parts of type {', '.join(kinds)} are not supported: this server serves text "
                                  "models", param="messages")
            content = "\n".join(p.text or "" for p in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content}


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    add_generation_prompt: bool = True
    """vLLM's extension: end the rendered prompt with the assistant's turn header."""

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(cls: type[_Request], raw: bytes) -> _Request:
    """Parse and check a request body; malformed JSON and invalid fields are 400s naming the field."""
    try:
        request = cls.model_validate_json(raw or b"")
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise OpenAIError(f"the request body is not valid JSON: {first['msg']}") from err
        field = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(x) for x in first["loc"]) or "body"
        got = json.dumps(first.get("input"), default=str)
        got = got if len(got) <= 80 else got[:77] + "..."
        raise OpenAIError(f"invalid {where}: {first['msg']}, got {got}", param=field) from err
    request.check()
    return request


# ---- responses -----------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def speculative_stats(m: RequestMetrics | None) -> dict | None:
    """The `speculative` extension field: how speculation went for one request."""
    if m is None:
        return None
    ttft = m.time_to_first_token
    return {
        "target_steps": m.target_steps,
        "generated_tokens": m.generated_tokens,
        "mean_tokens_per_step": round(m.mean_tokens_per_step, 4),
        "speculative_steps": m.speculative_steps,
        "acceptance_rates": [round(r, 4) for r in m.acceptance_rates],
        "time_to_first_token": None if ttft is None else round(ttft, 6),
    }


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str | None, stop_reason=None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_body(rid: str, created: int, model: str, text: str, finish_reason: str | None, stop_reason=None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason, "stop_reason": stop_reason}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}


def completion_chunk(rid: str, created: int, model: str, text: str | None, finish_reason: str | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}


def sse(data: dict | str) -> str:
    """One server-sent event as OpenAI streams them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
