"""`speculators serve MODEL`: an OpenAI-compatible HTTP server over `LLMEngine` (what `vllm serve` is to vLLM).

    speculators serve models/qwen2.5-coder-1.5b \\
        --speculative-config '{"model": "heads-dir", "method": "mlp_speculator", "num_speculative_tokens": 4}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    client.completions.create(model="models/qwen2.5-coder-1.5b", prompt="def fib(n):", max_tokens=64, temperature=0)

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (OpenAI's bodies, see openai_protocol.py),
/health, /metrics (Prometheus text).

Design, in three pieces:
    EngineLoop    one thread owns the engine: it applies queued adds / aborts, then calls `step()` while any
                  request is unfinished (it blocks on its command queue when idle), and hands each step's
                  outputs to the event loop with one `call_soon_threadsafe`. Every request runs with DELTA
                  outputs, so all running requests share the engine's batch and streams get tokens per step.
    handlers      asyncio (uvicorn's event loop): parse and check the request (every 400 is raised before
                  anything is queued), submit it, and read its outputs from a per-request asyncio.Queue.
    disconnects   a watcher task per request puts DISCONNECTED into its queue when the client goes away (also
                  while it is still waiting for a slot); leaving `EngineLoop.generate` before the last output
                  sends an abort, so the slot is free at the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speculators.infer.openai_protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    parse_request,
    speculative_stats,
    sse,
    usage,
)
from speculators.infer.outputs import RequestOutput
from speculators.infer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_STOP = object()  # tells the engine thread to finish
DISCONNECTED = object()  # put into a request's queue when its client goes away


class EngineError(RuntimeError):
    """The engine failed (or shut down) while it held the request."""


# ---- metrics -----------------------------------------------------------------------------------------------------


class ServerMetrics:
    """What /metrics reports. The engine thread writes, handlers read; one lock guards both."""

    RATE_WINDOW = 10.0  # seconds over which generation tokens/s is measured

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.received = self.aborted = self.failed = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0}
        self.prompt_tokens = self.generation_tokens = 0
        self.engine_steps, self.engine_seconds = 0, 0.0
        # over finished requests: tau = tokens / target steps, acceptance per draft position
        self.finished_tokens = self.target_steps = self.speculative_steps = 0
        self.acceptance_counts: list[int] = []
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step in the last RATE_WINDOW
        self.running = self.waiting = 0

    def added(self, n_prompt: int) -> None:
        with self.lock:
            self.received += 1
            self.prompt_tokens += n_prompt

    def stepped(self, outputs: list[RequestOutput], seconds: float) -> None:
        now = time.monotonic()
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        with self.lock:
            self.engine_steps += 1
            self.engine_seconds += seconds
            self.generation_tokens += tokens
            self.recent.append((now, tokens))
            while self.recent and self.recent[0][0] < now - self.RATE_WINDOW:
                self.recent.popleft()
            for out in outputs:
                if not out.finished:
                    continue
                reason = out.outputs[0].finish_reason or "stop"
                self.finished[reason] = self.finished.get(reason, 0) + 1
                m = out.metrics
                if m is not None:
                    self.finished_tokens += m.generated_tokens
                    self.target_steps += m.target_steps
                    self.speculative_steps += m.speculative_steps
                    counts = m.acceptance_counts
                    self.acceptance_counts += [0] * (len(counts) - len(self.acceptance_counts))
                    for d, c in enumerate(counts):
                        self.acceptance_counts[d] += c

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            tokens = sum(n for t, n in self.recent if t >= now - self.RATE_WINDOW)
        return tokens / max(min(self.RATE_WINDOW, now - self.started), 1e-3)

    def render(self, model_name: str) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        rate = self.tokens_per_second()
        label = 'model_name="' + model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        lines: list[str] = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP speculators_{name} {help_text}")
            lines.append(f"# TYPE speculators_{name} {kind}")
            for extra, value in samples:
                labels = ",".join([label] + [f'{k}="{v}"' for k, v in extra.items()])
                lines.append(f"speculators_{name}{{{labels}}} {value}")

        with self.lock:
            tau = self.finished_tokens / self.target_steps if self.target_steps else 0.0
            metric("num_requests_running", "gauge", "Requests holding a batch slot.", [({}, self.running)])
            metric("num_requests_waiting", "gauge", "Requests waiting for a batch slot.", [({}, self.waiting)])
            metric("requests_received_total", "counter", "Requests queued to the engine.", [({}, self.received)])
            metric("request_success_total", "counter", "Requests finished, by finish reason.",
                   [({"finish_reason": r}, n) for r, n in sorted(self.finished.items())])
            metric("requests_aborted_total", "counter", "Requests aborted because their client went away.",
                   [({}, self.aborted)])
            metric("requests_failed_total", "counter", "Requests failed by an engine error.", [({}, self.failed)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of queued requests.", [({}, self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Generated tokens.", [({}, self.generation_tokens)])
            metric("generation_tokens_per_second", "gauge",
                   f"Generated tokens per second over the last {self.RATE_WINDOW:g} s.", [({}, round(rate, 3))])
            metric("engine_steps_total", "counter", "Engine steps (prefills of new requests plus one decode step).",
                   [({}, self.engine_steps)])
            metric("engine_step_seconds_total", "counter", "Seconds spent in engine steps.",
                   [({}, round(self.engine_seconds, 6))])
            metric("target_steps_total", "counter", "Target forwards that produced tokens, over finished requests.",
                   [({}, self.target_steps)])
            metric("mean_tokens_per_step", "gauge",
                   "tau: generated tokens per target step over finished requests (1 without speculation).",
                   [({}, round(tau, 4))])
            n = self.speculative_steps
            metric("acceptance_rate", "gauge",
                   "Fraction of speculative steps accepting at least position + 1 draft tokens (finished requests).",
                   [({"position": d}, round(c / n, 4) if n else 0.0) for d, c in enumerate(self.acceptance_counts)])
        return "\n".join(lines) + "\n"


# ---- the engine thread -------------------------------------------------------------------------------------------


class EngineLoop:
    """The one thread that owns an `LLMEngine`; asyncio handlers talk to it through `generate`.

    Threads: `commands` (a thread-safe queue) carries adds and aborts to the engine thread; outputs come back
    through `loop.call_soon_threadsafe`, once per step. `queues` is touched only on the event loop's thread,
    `live` (requests in the engine) only on the engine thread.
    """

    def __init__(self, engine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.queues: dict[str, asyncio.Queue] = {}
        self.live: set[str] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    # ---- event-loop side ----

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="speculators-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Abort what is left and join the engine thread (called on the event loop at shutdown)."""
        if self.thread is not None:
            self.commands.put(_STOP)
            self.thread.join(timeout)
        self._fail_waiting(EngineError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                       until_disconnected: Callable[[], Awaitable] | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs as the engine produces them (params.output_kind decides what
        each holds). Returns early when `until_disconnected()` completes; leaving early aborts the request.
        Engine errors are raised: ValueError for a request the engine refused, EngineError otherwise."""
        if not self.alive:
            raise EngineError("the engine is not running")
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        watcher = None if until_disconnected is None else asyncio.ensure_future(self._watch(until_disconnected, q))
        self.commands.put(("add", request_id, list(prompt_token_ids), params, prompt))
        finished = False
        try:
            while True:
                item = await q.get()
                if item is DISCONNECTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            self.queues.pop(request_id, None)
            if not finished:
                self.commands.put(("abort", request_id))

    @staticmethod
    async def _watch(until_disconnected: Callable[[], Awaitable], q: asyncio.Queue) -> None:
        await until_disconnected()
        q.put_nowait(DISCONNECTED)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            q = self.queues.get(request_id)
            if q is not None:
                q.put_nowait(item)

    # ---- engine-thread side ----

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # a bug, not a bad request: /health turns 503, waiting handlers get a 500
            logger.exception("the engine thread died")
            if self.loop is not None:
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self._fail_waiting, EngineError(f"the engine thread died: {err!r}"))

    def _fail_waiting(self, err: Exception) -> None:
        for q in self.queues.values():
            q.put_nowait(err)

    def _serve(self) -> None:
        engine, metrics = self.engine, self.metrics
        while True:
            commands = [self.commands.get()] if not engine.has_unfinished_requests() else []  # idle: block
            with contextlib.suppress(queue.Empty):
                while True:
                    commands.append(self.commands.get_nowait())
            deliveries: list[tuple[str, object]] = []
            for command in commands:
                if command is _STOP:
                    self._send(deliveries + self._drop_all(EngineError("the server is shutting down")))
                    return
                deliveries += self._apply(command)
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception as err:  # keep serving: fail the requests the engine held, not the server
                    logger.exception("engine step failed; failing its %d requests", len(self.live))
                    deliveries += self._drop_all(EngineError(f"the engine failed: {err!r}"))
                else:
                    metrics.stepped(outputs, time.perf_counter() - start)
                    for out in outputs:
                        deliveries.append((out.request_id, out))
                        if out.finished:
                            self.live.discard(out.request_id)
            waiting = len(getattr(engine, "waiting", ()))
            metrics.running, metrics.waiting = engine.get_num_unfinished_requests() - waiting, waiting
            self._send(deliveries)

    def _apply(self, command: tuple) -> list[tuple[str, object]]:
        if command[0] == "add":
            _, request_id, ids, params, prompt = command
            try:
                self.engine.add_request(request_id, ids, params, prompt=prompt)
            except Exception as err:  # checked before queueing; whatever is left goes back to the handler
                return [(request_id, err)]
            self.live.add(request_id)
            self.metrics.added(len(ids))
        else:  # abort
            request_id = command[1]
            if request_id in self.live:
                self.engine.abort_request(request_id)
                self.live.discard(request_id)
                with self.metrics.lock:
                    self.metrics.aborted += 1
        return []

    def _drop_all(self, err: Exception) -> list[tuple[str, object]]:
        dropped = sorted(self.live)
        for request_id in dropped:
            self.engine.abort_request(request_id)
        self.live.clear()
        with self.metrics.lock:
            self.metrics.failed += len(dropped)
        return [(request_id, err) for request_id in dropped]

    def _send(self, deliveries: list[tuple[str, object]]) -> None:
        if deliveries and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
                self.loop.call_soon_threadsafe(self._deliver, deliveries)


# ---- HTTP --------------------------------------------------------------------------------------------------------


async def wait_disconnected(request: Request) -> None:
    """Return when the client of `request` (whose body was read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events that close their generator however the response ends, so an abandoned request is
    aborted at once (Starlette leaves an unfinished body iterator to the garbage collector)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAIServer:
    """OpenAI's endpoints over one `LLM`; `app` is the FastAPI application (started by uvicorn).

    Args:
        llm: the loaded `speculators.infer.LLM`; the server's engine thread owns its engine from startup on.
        served_model_names: names the `model` field may take (first: the one reported); default: the model path.
        api_key: when set, /v1 requests need `Authorization: Bearer <api_key>` (/health, /metrics stay open).
        chat_template: a Jinja template that replaces the tokenizer's own.
    """

    def __init__(self, llm, *, served_model_names: list[str] | None = None, api_key: str | None = None,
                 chat_template: str | None = None):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.get_tokenizer()
        self.names = list(served_model_names or [llm.model_name])
        self.api_key = api_key
        self.chat_template = chat_template
        self.created = int(time.time())
        self.loop = EngineLoop(self.engine)
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.loop.start(asyncio.get_running_loop())
            try:
                yield
            finally:
                self.loop.stop()

        app = FastAPI(title="speculators serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(OpenAIError, self._error)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self._check_key)])
        v1.add_api_route("/models", self.models, methods=["GET"])
        v1.add_api_route("/completions", self.completions, methods=["POST"])
        v1.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        app.include_router(v1)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        return app

    # ---- errors, auth, checks ----

    @staticmethod
    async def _error(request: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @staticmethod
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return JSONResponse(OpenAIError(str(err.detail), err.status_code, code=code).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    async def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise OpenAIError("Missing API key: send it as the header 'Authorization: Bearer KEY'", 401, code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise OpenAIError("Incorrect API key provided", 401, code="invalid_api_key")

    def _model(self, requested: str | None) -> str:
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise OpenAIError(f"The model `{requested}` does not exist. Served: {', '.join(self.names)}", 404,
                              param="model", code="model_not_found")
        return requested

    def _check_fits(self, ids: list[int], params: SamplingParams, max_new: int | None, param: str) -> None:
        """Refuse (400) what the engine would refuse, before anything is queued."""
        max_len = self.engine.max_model_len
        try:
            self.engine.check_prompt(ids)
        except ValueError as err:
            raise OpenAIError(str(err), param=param, code="context_length_exceeded" if len(ids) >= max_len else None) from err
        if max_new is not None and len(ids) + max_new > max_len:
            raise OpenAIError(
                f"This model's maximum context length is {max_len} tokens. However, you requested {len(ids) + max_new} "
                f"tokens ({len(ids)} in the {param}, {max_new} in the completion). Reduce the length of the {param} "
                "or the completion.", param="max_tokens", code="context_length_exceeded")
        if params.stop_strings and self.tokenizer is None:
            raise OpenAIError("stop strings need a tokenizer, and this model has none", param="stop")

    def _render_chat(self, req: ChatCompletionRequest) -> str:
        if self.tokenizer is None:
            raise OpenAIError("chat completions need a tokenizer, and this model has none: use /v1/completions with token ids")
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise OpenAIError("this model's tokenizer has no chat template: start the server with --chat-template, or "
                              "use /v1/completions")
        messages = [m.for_template() for m in req.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                                                      chat_template=self.chat_template)
        except Exception as err:  # jinja2 errors, raise_exception() in templates, bad message shapes
            raise OpenAIError(f"the chat template could not render these messages: {err}", param="messages") from err

    # ---- routes ----

    async def health(self) -> Response:
        return Response(status_code=200 if self.loop.alive else 503)

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.loop.metrics.render(self.names[0]), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self) -> dict:
        card = {"object": "model", "created": self.created, "owned_by": "speculators", "root": str(self.llm.model_name),
                "parent": None, "max_model_len": self.engine.max_model_len}
        return {"object": "list", "data": [{"id": name, **card} for name in self.names]}

    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await request.body())
        model = self._model(req.model)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise OpenAIError("this model has no tokenizer: send the prompt as token ids", param="prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)  # as LLM.generate encodes a string prompt
        else:
            text, ids = None, list(prompt)
        params = req.sampling_params(DEFAULT_COMPLETION_MAX_TOKENS)
        self._check_fits(ids, params, req.max_new_tokens(), "prompt")
        return await self._respond(request, req, f"cmpl-{uuid.uuid4().hex}", model, text, ids, params, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await request.body())
        model = self._model(req.model)
        text = self._render_chat(req)
        ids = self.tokenizer.encode(text, add_special_tokens=False)  # as LLM.chat encodes the rendered text
        params = req.sampling_params(None)
        self._check_fits(ids, params, req.max_new_tokens(), "messages")
        return await self._respond(request, req, f"chatcmpl-{uuid.uuid4().hex}", model, text, ids, params, chat=True)

    async def _respond(self, request: Request, req, rid: str, model: str, text, ids, params, chat: bool) -> Response:
        outputs = self.loop.generate(rid, ids, params, text, functools.partial(wait_disconnected, request))
        created = int(time.time())
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return EventStream(self._events(outputs, rid, created, model, len(ids), include_usage, chat))
        pieces, n_tokens, last = [], 0, None
        try:
            async with contextlib.aclosing(outputs) as it:
                async for out in it:
                    pieces.append(out.outputs[0].text)
                    n_tokens += len(out.outputs[0].token_ids)
                    last = out
        except ValueError as err:
            raise OpenAIError(str(err)) from err
        except EngineError as err:
            raise OpenAIError(str(err), 500) from err
        if last is None or not last.finished:  # the client went away; nobody reads this
            return Response(status_code=499)
        c = last.outputs[0]
        body = (chat_body if chat else completion_body)(rid, created, model, "".join(pieces), c.finish_reason, c.stop_reason)
        body["usage"] = usage(len(ids), n_tokens)
        body["speculative"] = speculative_stats(last.metrics)
        return JSONResponse(body)

    async def _events(self, outputs: AsyncIterator[RequestOutput], rid: str, created: int, model: str, n_prompt: int,
                      include_usage: bool, chat: bool) -> AsyncIterator[str]:
        n_tokens = 0
        async with contextlib.aclosing(outputs) as it:
            try:
                if chat:
                    yield sse(chat_chunk(rid, created, model, {"role": "assistant", "content": ""}))
                async for out in it:
                    c = out.outputs[0]
                    n_tokens += len(c.token_ids)
                    if not c.text and not out.finished:  # tokens whose text is not complete yet
                        continue
                    if chat:
                        delta = {"content": c.text} if c.text else {}
                        chunk = chat_chunk(rid, created, model, delta, c.finish_reason)
                    else:
                        chunk = completion_chunk(rid, created, model, c.text, c.finish_reason)
                    if out.finished:
                        chunk["choices"][0]["stop_reason"] = c.stop_reason
                        chunk["speculative"] = speculative_stats(out.metrics)
                    yield sse(chunk)
                    if out.finished and include_usage:
                        chunk = (chat_chunk if chat else completion_chunk)(rid, created, model, None)
                        chunk["usage"] = usage(n_prompt, n_tokens)
                        yield sse(chunk)
            except (ValueError, EngineError) as err:  # after the 200: the error travels as an event
                yield sse(OpenAIError(str(err), 400 if isinstance(err, ValueError) else 500).body())
        yield sse("[DONE]")


# ---- command line ------------------------------------------------------------------------------------------------


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="speculators serve",
        description="Serve a model, optionally with a speculator, behind OpenAI's API (/v1/completions, "
        "/v1/chat/completions, /v1/models), plus /health and /metrics. Flags are vLLM's; --a_b is read as --a-b.",
    )
    p.add_argument("model", help="target model: a local HF checkpoint directory or a Hub id")
    p.add_argument("--speculative-config", type=_json_dict, default=None, metavar="JSON",
                   help='e.g. \'{"model": "HEADS", "method": "mlp_speculator", "num_speculative_tokens": 4}\' '
                   "(see speculators.infer.LLM); default: plain decoding")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), bfloat16, float16, float32")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N, cpu")
    p.add_argument("--api-key", default=os.environ.get("SPECULATORS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SPECULATORS_API_KEY, else no key)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length; default min(the model's, 4096)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests decoded at once (batch slots); default 16")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients use in 'model' (the first is reported); default: the model argument")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or id; default: the model's")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling of requests that give no seed")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    p.add_argument("--model-impl", default="auto", choices=["auto", "own", "hf"])
    p.add_argument("--warmup-len", type=int, default=2048,
                   help="with CUDA graphs, compile and capture every decode step up to this many tokens per sequence "
                        "before serving, so no request pays for it (0: capture on first use)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    argv = list(sys.argv[1:] if argv is None else argv)
    # vLLM accepts --speculative_config as well as --speculative-config: so do we.
    argv = [a.partition("=")[0].replace("_", "-") + "".join(a.partition("=")[1:]) if a.startswith("--") else a for a in argv]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from speculators.infer.llm import LLM

    template = args.chat_template
    if template is not None and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    try:
        llm = LLM(args.model, tokenizer=args.tokenizer, speculative_config=args.speculative_config, dtype=args.dtype,
                  device=None if args.device == "auto" else args.device, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, seed=args.seed, enforce_eager=args.enforce_eager,
                  model_impl=args.model_impl)
    except (ValueError, OSError) as err:
        print(f"speculators serve: error: {err}", file=sys.stderr)
        return 1
    if args.warmup_len > 0 and llm.engine.graphs.use_graphs:
        logger.info("capturing decode steps up to %d tokens per sequence ...", args.warmup_len)
        logger.info("captured in %.1f s", llm.warmup(max_len=args.warmup_len))  # greedy; sampling on first use
    server = OpenAIServer(llm, served_model_names=args.served_model_name, api_key=args.api_key, chat_template=template)
    spec = args.speculative_config or {}
    logger.info("serving %s as %s on http://%s:%d (speculation: %s, max_model_len %d, %d slots, %s on %s)",
                args.model, ", ".join(server.names), args.host, args.port, spec.get("method", "off"),
                llm.engine.max_model_len, llm.engine.n_slots, llm.dtype, llm.device)
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
