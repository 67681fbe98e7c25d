"""One request's host-side state: its tokens, incremental detokenisation, stop conditions and reporting."""

from __future__ import annotations

import time

from speculators.infer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from speculators.infer.sampling_params import RequestOutputKind, SamplingParams

# Prompt tokens kept as context when detokenising the first generated tokens (vLLM's offset): SentencePiece
# and byte-level tokenizers render a token's leading space or partial character from its neighbours.
PROMPT_CONTEXT = 5


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, max_model_len: int, eos_token_ids: set[int], tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seed = seed
        self.tokenizer = tokenizer
        self.stop_ids = set(params.stop_token_ids)
        self.eos_ids = set() if params.ignore_eos else set(eos_token_ids)
        room = max_model_len - len(prompt_token_ids)
        self.max_tokens = min(params.max_tokens or room, room)
        self.output_ids: list[int] = []
        self.slot: int | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        # incremental detokenisation (vLLM's prefix / read offsets over context + output ids)
        ctx = prompt_token_ids[-PROMPT_CONTEXT:]
        self._ids = list(ctx)
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._n_text_tokens = 0  # output tokens already rendered into text
        self.text = ""
        self._last_new_chars = 0
        self._reported_tokens = 0
        self._reported_text = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _finish(self, reason: str, stop_reason=None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.metrics.finished_time = time.monotonic()

    def append(self, tokens: list[int], drafted: int | None, depth: int) -> None:
        """Add the tokens one target step emitted (drafted: accepted draft tokens, None for a prefill)."""
        m = self.metrics
        if m.first_token_time is None:
            m.first_token_time = time.monotonic()
        m.target_steps += 1
        if drafted is not None and depth:
            m.speculative_steps += 1
            if len(m.acceptance_counts) < depth:
                m.acceptance_counts += [0] * (depth - len(m.acceptance_counts))
            for d in range(drafted):
                m.acceptance_counts[d] += 1
        n = 0
        stop_strings = self.params.stop_strings
        for t in tokens:
            self.output_ids.append(t)
            n += 1
            if t in self.eos_ids:
                self._finish("stop")
            elif t in self.stop_ids:
                self._finish("stop", t)
            else:
                if stop_strings:
                    self._detokenize(len(self.output_ids))
                    if self._check_stop_strings():
                        break
                if len(self.output_ids) >= self.max_tokens:
                    self._finish("length")
            if self.finished:
                break
        m.tokens_per_step.append(n)
        m.generated_tokens = len(self.output_ids)

    def _check_stop_strings(self) -> bool:
        # Only the newest text can complete a stop string: search the tail that could hold one.
        longest = max(len(s) for s in self.params.stop_strings)
        start = max(0, len(self.text) - self._last_new_chars - longest + 1)
        best = None
        for s in self.params.stop_strings:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self._finish("stop", s)
        return True

    def _detokenize(self, upto: int) -> None:
        """Render output tokens [n_text_tokens, upto) into self.text."""
        self._last_new_chars = 0
        if self.tokenizer is None:
            self._n_text_tokens = upto
            return
        skip = self.params.skip_special_tokens
        while self._n_text_tokens < upto:
            self._ids.append(self.output_ids[self._n_text_tokens])
            self._n_text_tokens += 1
            prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
            full = self.tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new = full[len(prefix) :]
                self.text += new
                self._last_new_chars += len(new)
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def _text_tokens(self) -> int:
        """Output tokens that belong in the text: all but a final EOS / stop token."""
        n = len(self.output_ids)
        if self.finish_reason == "stop" and not isinstance(self.stop_reason, str) and n:
            n -= 1
        return n

    def output(self) -> RequestOutput | None:
        """The RequestOutput to report now, per the request's output_kind (None: nothing to report)."""
        kind = self.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        if not (self.finished and self.finish_reason == "stop" and isinstance(self.stop_reason, str)):
            self._detokenize(self._text_tokens())
        visible = len(self.text)
        if self.params.stop_strings and not self.finished:
            # Hold back what could be the start of a stop string, so reported text is never taken back.
            visible = max(self._reported_text, visible - max(len(s) for s in self.params.stop_strings) + 1)
        if kind == RequestOutputKind.DELTA:
            ids, text = self.output_ids[self._reported_tokens :], self.text[self._reported_text : visible]
            if not ids and not text and not self.finished:
                return None
        else:
            ids, text = list(self.output_ids), self.text[:visible]
        self._reported_tokens, self._reported_text = len(self.output_ids), visible
        completion = CompletionOutput(0, text, list(ids), self.finish_reason, self.stop_reason)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [completion], self.finished, self.metrics)
