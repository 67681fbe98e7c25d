"""`speculators serve` (infer/server.py): the real server (uvicorn on a free loopback port) over a tiny random
model, driven by the official `openai` client. Every wait has a timeout, so the file stops by itself."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_target  # noqa: E402

from speculators import MLPSpeculator, MLPSpeculatorConfig  # noqa: E402
from speculators.infer import LLM, SamplingParams  # noqa: E402
from speculators.infer.server import OpenAIServer  # noqa: E402

KEY = "test-key"
NAMES = ["tiny", "tiny-alias"]
MAX_TOKENS = 24
MAX_MODEL_LEN = 256
PROMPTS = ["def fib(n):", "The quick brown fox", "import torch\n", "Once upon a time", "class Node:", "hello world",
           "for i in range(10):", "SELECT * FROM"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write fib in Python."}]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "The quick brown fox jumps over the lazy dog. ",
          "import torch\nclass Node:\n    pass\n", "Once upon a time, hello world. SELECT * FROM table;\n"] * 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def make_tokenizer():
    """A byte-level BPE trained in milliseconds (nothing downloaded), with a ChatML template; <|im_end|> is id 2,
    the tiny target's EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<s>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(target dir with tokenizer, MLP heads dir), random weights."""
    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer()
    target = tiny_target(vocab_size=len(tok))
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    torch.manual_seed(0)
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=len(tok), emb_dim=target.config.hidden_size, n_predict=3)).save_pretrained(root / "heads")
    return root / "target", root / "heads"


@pytest.fixture(scope="module")
def llm(dirs):
    target, heads = dirs
    spec = {"model": str(heads), "method": "mlp_speculator", "num_speculative_tokens": 3}
    return LLM(str(target), speculative_config=spec, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
               max_num_seqs=8, seed=0)


@pytest.fixture(scope="module")
def ref(llm):
    """Offline outputs, computed before any server owns the engine."""
    out = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    sampled = llm.generate(PROMPTS[:4], [SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=MAX_TOKENS) for i in range(4)],
                           use_tqdm=False)
    chat = llm.chat(CHAT, GREEDY, use_tqdm=False)[0]
    return {
        "text": {p: o.outputs[0].text for p, o in zip(PROMPTS, out)},
        "tokens": {p: len(o.outputs[0].token_ids) for p, o in zip(PROMPTS, out)},
        "finish": {p: o.outputs[0].finish_reason for p, o in zip(PROMPTS, out)},
        "sampled": [o.outputs[0].text for o in sampled],
        "chat": chat.outputs[0].text,
        "chat_prompt_tokens": len(chat.prompt_token_ids),
    }


@contextlib.contextmanager
def running_server(llm, **kwargs):
    """uvicorn serving an OpenAIServer on a free loopback port, in a thread; yields (base url, server)."""
    srv = OpenAIServer(llm, served_model_names=NAMES, api_key=KEY, **kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(srv.app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", srv
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"
        assert not srv.loop.alive, "the engine thread did not stop"


def client(url, key=KEY, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=kwargs.pop("timeout", 30), **kwargs)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def metric(url, name):
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"speculators_{name}{{"))


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_models_health_metrics(llm):
    with running_server(llm) as (url, _):
        models = client(url).models.list()
        assert [m.id for m in models.data] == NAMES
        assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # open without a key, like /metrics
        text = httpx.get(url + "/metrics", timeout=10).text
        for name in ("num_requests_running", "num_requests_waiting", "generation_tokens_per_second",
                     "mean_tokens_per_step", "request_success_total", "requests_aborted_total"):
            assert f"# TYPE speculators_{name} " in text


def test_completions_and_chat_equal_offline(llm, ref):
    with running_server(llm) as (url, _):
        c = client(url)
        for i, prompt in enumerate(PROMPTS):
            r = c.completions.create(model=NAMES[i % 2], prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert r.choices[0].text == ref["text"][prompt]
            assert r.choices[0].finish_reason == ref["finish"][prompt]
            assert r.model == NAMES[i % 2]
            n_prompt = len(llm.get_tokenizer().encode(prompt))
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, ref["tokens"][prompt])
            assert r.usage.total_tokens == n_prompt + ref["tokens"][prompt]
            spec = r.model_extra["speculative"]
            assert spec["generated_tokens"] == ref["tokens"][prompt] and spec["target_steps"] >= 1
            assert 1.0 <= spec["mean_tokens_per_step"] <= 4.0 and len(spec["acceptance_rates"]) in (0, 3)
        # token-id prompts, and seeded sampling: the same tokens whatever else shares the batch
        ids = llm.get_tokenizer().encode(PROMPTS[0])
        assert c.completions.create(model="tiny", prompt=ids, max_tokens=MAX_TOKENS, temperature=0).choices[0].text == ref["text"][PROMPTS[0]]
        for i, prompt in enumerate(PROMPTS[:4]):
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=i)
            assert r.choices[0].text == ref["sampled"][i]
        chat = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == ref["chat"]
        assert chat.usage.prompt_tokens == ref["chat_prompt_tokens"]
        assert chat.model_extra["speculative"]["generated_tokens"] == chat.usage.completion_tokens


def test_streaming_equals_non_streaming(llm, ref):
    with running_server(llm) as (url, _):
        c = client(url)
        for prompt in PROMPTS[:3]:
            chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref["text"][prompt]
            finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            assert len(finals) == 1 and finals[0].choices[0].finish_reason == ref["finish"][prompt]
            assert finals[0].model_extra["speculative"]["generated_tokens"] == ref["tokens"][prompt]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref["tokens"][prompt]
            assert len({ch.id for ch in chunks}) == 1
        chunks = list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref["chat"]
        assert chunks[-1].choices[0].finish_reason is not None and all(ch.usage is None for ch in chunks)
        # the raw wire format: data: {...} events, then data: [DONE]
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}
        raw = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        events = [e for e in raw.text.split("\n\n") if e]
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        assert json.loads(events[0][6:])["object"] == "text_completion"


def test_errors(llm):
    with running_server(llm) as (url, srv):
        c = client(url)

        def error(call, **kwargs):
            kw = {"model": "tiny", "max_tokens": 4, **kwargs}
            if call == c.completions.create:
                kw.setdefault("prompt", "hi")
            with pytest.raises(openai.APIStatusError) as info:
                call(**kw)
            return info.value.status_code, info.value.body

        status, body = error(c.completions.create, n=2)
        assert status == 400 and body["param"] == "n" and "n must be 1" in body["message"]
        status, body = error(c.completions.create, temperature=-1)
        assert status == 400 and body["message"] == "temperature must be >= 0, got -1.0" and body["param"] == "temperature"
        assert error(c.completions.create, top_p=2.0)[1]["message"] == "top_p must be in (0, 1], got 2.0"
        assert error(c.completions.create, extra_body={"top_k": "a"})[1]["param"] == "top_k"
        assert error(c.completions.create, logprobs=2)[1]["param"] == "logprobs"
        assert error(c.completions.create, stream_options={"include_usage": True})[1]["param"] == "stream_options"
        assert error(c.completions.create, prompt=["a", "b"])[1]["param"] == "prompt"
        status, body = error(c.completions.create, model="nope")
        assert status == 404 and body["code"] == "model_not_found" and body["type"] == "invalid_request_error"
        status, body = error(c.completions.create, prompt="hello world " * MAX_MODEL_LEN)
        assert status == 400 and body["code"] == "context_length_exceeded" and "max_model_len" in body["message"]
        status, body = error(c.completions.create, max_tokens=MAX_MODEL_LEN)
        assert status == 400 and body["code"] == "context_length_exceeded"
        status, body = error(c.chat.completions.create, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
        assert status == 400 and "image_url" in body["message"]
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=auth, timeout=10)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "not valid JSON" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "stream": "yes"}, headers=auth, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
        assert httpx.get(url + "/v1/nothing", headers=auth, timeout=10).json()["error"]["code"] == "not_found"
        assert not srv.engine.has_unfinished_requests() and metric(url, "requests_received_total") == 0


def test_load_64_concurrent_streams(llm, ref):
    """64 streaming clients share the 8 batch slots; all finish, outputs equal offline, nothing leaks."""
    threads_before = set(threading.enumerate())
    with running_server(llm) as (url, srv):

        async def one(c, i):
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = await c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
            return prompt, "".join([ch.choices[0].text async for ch in stream if ch.choices])

        async def main():
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
                return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(64))), timeout=60)

        start = time.monotonic()
        results = asyncio.run(main())
        seconds = time.monotonic() - start
        assert len(results) == 64 and all(text == ref["text"][prompt] for prompt, text in results)
        assert wait_until(lambda: not srv.engine.has_unfinished_requests(), 5)
        assert metric(url, "requests_received_total") == 64 and metric(url, "request_success_total") == 64
        assert metric(url, "requests_aborted_total") == 0 and metric(url, "num_requests_running") == 0
        assert metric(url, "generation_tokens_total") == 8 * sum(ref["tokens"].values())
        assert metric(url, "engine_steps_total") < metric(url, "generation_tokens_total") / 4  # requests shared steps
        assert not srv.loop.queues
    assert wait_until(lambda: set(threading.enumerate()) <= threads_before, 5), set(threading.enumerate()) - threads_before
    print(f"64 streams in {seconds:.2f} s")


def test_disconnect_aborts(llm):
    """A streaming client that closes early, and a non-streaming one that times out, free their slots."""
    engine = llm.engine
    step = engine.step

    def slow_step():  # so a request cannot finish before its client goes away
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    try:
        with running_server(llm) as (url, srv):
            c = client(url)
            stream = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=200, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
            next(iter(stream))
            stream.close()
            assert wait_until(lambda: metric(url, "requests_aborted_total") == 1), "the streaming request was not aborted"
            assert wait_until(lambda: not engine.has_unfinished_requests(), 5)
            with pytest.raises(openai.APITimeoutError):
                client(url, timeout=0.3).completions.create(model="tiny", prompt="hi", max_tokens=200, temperature=0,
                                                            extra_body={"ignore_eos": True})
            assert wait_until(lambda: metric(url, "requests_aborted_total") == 2), "the timed-out request was not aborted"
            assert wait_until(lambda: not engine.has_unfinished_requests(), 5) and not srv.loop.queues
            assert metric(url, "request_success_total") == 0
            # the server still serves
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0).choices[0].finish_reason
    finally:
        del engine.step


def test_engine_error_fails_its_requests_not_the_server(llm):
    engine = llm.engine
    step = engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()

    engine.step = failing_step
    try:
        with running_server(llm) as (url, srv):
            c = client(url)
            with pytest.raises(openai.InternalServerError) as info:
                c.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
            assert "boom" in info.value.body["message"] and info.value.body["type"] == "server_error"
            assert metric(url, "requests_failed_total") == 1 and not engine.has_unfinished_requests()
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0).choices[0].finish_reason
            assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        del engine.step


def test_cli_serves_with_a_draft_model(dirs, ref, tmp_path):
    """`python -m speculators.infer.server` end to end in a subprocess; the target as its own draft model accepts
    every greedy draft, so tau shows in the `speculative` field."""
    target, _ = dirs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = json.dumps({"model": str(target), "method": "draft_model", "num_speculative_tokens": 3, "adaptive": False})
    cmd = [sys.executable, "-m", "speculators.infer.server", str(target), "--speculative_config", spec, "--port", str(port),
           "--served-model-name", "tiny", "--device", "cpu", "--dtype", "float32", "--api-key", KEY,
           "--max-model-len", "128", "--log-level", "warning"]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            return True
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url + "/health", timeout=1).status_code == 200
        return False

    try:
        assert wait_until(up, 90) and proc.poll() is None, (tmp_path / "server.log").read_text()
        r = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == ref["text"][PROMPTS[0]]  # lossless: the same text as the MLP heads' engine
        spec = r.model_extra["speculative"]
        assert spec["mean_tokens_per_step"] > 2 and spec["acceptance_rates"][0] > 0.9, spec
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()
