"""The vLLM-style surface: text, stop strings / tokens, EOS, lengths, streaming, chat, the engine API, errors."""

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from test_infer_common import DEVICE, char_tokenizer, greedy_reference, ids, one_thread, save, target  # noqa: F401
from tiny_models import tiny_target

from speculators import MLPSpeculator, MLPSpeculatorConfig
from speculators.infer import LLM, LLMEngine, RequestOutputKind, SamplingParams

PROMPT = "Hello, world"
SPECS = {
    "plain": None,
    "draft_self": lambda d: {"model": d, "method": "draft_model", "num_speculative_tokens": 3, "adaptive": False},
}


@functools.cache
def llm(spec_name: str = "plain", max_num_seqs: int = 4) -> LLM:
    _, d = target("llama")
    spec = SPECS[spec_name]
    return LLM(d, device=DEVICE, dtype="float64", max_model_len=128, max_num_seqs=max_num_seqs, speculative_config=spec(d) if spec else None)


def greedy(n=40, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def full_output(spec_name="plain", n=40):
    return llm(spec_name).generate(PROMPT, greedy(n), use_tqdm=False)[0].outputs[0]


def test_text_prompt_and_text():
    out = llm().generate(PROMPT, greedy(), use_tqdm=False)[0]
    tok = char_tokenizer()
    assert out.prompt == PROMPT and out.prompt_token_ids == tok.encode(PROMPT)
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert out.outputs[0].finish_reason == "length" and out.finished
    assert "RequestOutput(request_id=" in repr(out)


@pytest.mark.parametrize("spec_name", ["plain", "draft_self"])
def test_stop_strings(spec_name):
    full = full_output(spec_name)
    text, tok = full.text, char_tokenizer()
    stop = text[12:14]
    cut = text.find(stop)
    out = llm(spec_name).generate(PROMPT, greedy(stop=[stop, "never-there"]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    # token_ids end with the token that completed the stop string, even mid-way through a speculative step
    k = next(k for k in range(1, len(full.token_ids) + 1) if stop in tok.decode(full.token_ids[:k]))
    assert out.token_ids == full.token_ids[:k]
    kept = llm(spec_name).generate(PROMPT, greedy(stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: cut + len(stop)]


@pytest.mark.parametrize("spec_name", ["plain", "draft_self"])
def test_stop_token_ids_and_max_tokens(spec_name):
    full = full_output(spec_name)
    t = full.token_ids[9]
    first = full.token_ids.index(t)
    out = llm(spec_name).generate(PROMPT, greedy(stop_token_ids=[t]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop" and out.stop_reason == t
    assert out.text == char_tokenizer().decode(full.token_ids[:first])
    short = llm(spec_name).generate(PROMPT, greedy(7), use_tqdm=False)[0].outputs[0]
    assert short.token_ids == full.token_ids[:7] and short.finish_reason == "length"


def test_eos_from_generation_config():
    model, _ = target("llama")
    prompt = [4, 5, 6]
    ref = greedy_reference(model, prompt, 30)
    eos = ref[6]
    d = save(tiny_target("llama").double())
    config = json.loads((Path(d) / "generation_config.json").read_text())
    config["eos_token_id"] = [eos, 127]
    (Path(d) / "generation_config.json").write_text(json.dumps(config))
    for spec in (None, {"model": d, "method": "draft_model", "num_speculative_tokens": 3}):
        engine_llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=128, speculative_config=spec)
        stopped = engine_llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
        assert stopped.token_ids == ref[: ref.index(eos) + 1] and stopped.finish_reason == "stop" and stopped.stop_reason is None
        ignored = engine_llm.generate({"prompt_token_ids": prompt}, greedy(30), use_tqdm=False)[0].outputs[0]
        assert ignored.token_ids == ref


def test_request_finishing_at_prefill_frees_its_slot_first():
    """A long prompt done after its first token must not join the decode step (its slots lie past the bucket)."""
    model, d = target("llama")
    small = LLM(d, device=DEVICE, dtype="float64", max_model_len=256, max_num_seqs=2, speculative_config=SPECS["draft_self"](d))
    long_prompt, short_prompt = [7] * 200, [3, 4, 5]
    outs = small.generate([{"prompt_token_ids": long_prompt}, {"prompt_token_ids": short_prompt}],
                          [greedy(1), greedy(20)], use_tqdm=False)
    assert ids(outs) == [greedy_reference(model, long_prompt, 1), greedy_reference(model, short_prompt, 20)]


def test_context_length_ends_with_length():
    _, d = target("llama")
    small = LLM(d, device=DEVICE, dtype="float64", max_model_len=20, speculative_config=SPECS["draft_self"](d))
    out = small.generate({"prompt_token_ids": list(range(3, 15))}, greedy(100), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 20 - 12 and out.finish_reason == "length"


@pytest.mark.parametrize("spec_name", ["plain", "draft_self"])
def test_stream_matches_generate(spec_name):
    prompts = [PROMPT, "abc", "The quick brown fox"]
    full = full_output(spec_name)
    params = [greedy(), greedy(25), greedy(40, stop=full.text[20:23])]
    finals = llm(spec_name).generate(prompts, params, use_tqdm=False)
    texts, tokens, finished = {}, {}, {}
    for out in llm(spec_name).stream(prompts, params):
        rid = out.request_id
        texts[rid] = texts.get(rid, "") + out.outputs[0].text
        tokens[rid] = tokens.get(rid, []) + out.outputs[0].token_ids
        finished[rid] = out.finished
    order = sorted(texts, key=int)
    assert [texts[r] for r in order] == [f.outputs[0].text for f in finals]
    assert [tokens[r] for r in order] == [f.outputs[0].token_ids for f in finals]
    assert all(finished.values())


def test_chat_applies_template():
    chat = llm().chat([{"role": "user", "content": "hi"}], greedy(10), use_tqdm=False)[0]
    tok = char_tokenizer()
    assert chat.prompt_token_ids == tok.encode("user: hi\nassistant: ", add_special_tokens=False)
    direct = llm().generate({"prompt_token_ids": chat.prompt_token_ids}, greedy(10), use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_engine_api_abort_and_continuous_batching():
    model, d = target("llama")
    engine = llm("draft_self", max_num_seqs=2).engine
    prompts = {"a": [3, 4, 5], "b": [9] * 7, "c": [20, 21], "d": [5]}
    for rid, p in prompts.items():
        engine.add_request(rid, p, greedy(30).clone(output_kind=RequestOutputKind.CUMULATIVE))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1], greedy())
    seen, done = set(), {}
    aborted = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.add(out.request_id)
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if not aborted and "a" in seen:
            engine.abort_request("b")  # running or waiting: its slot goes to the next request
            aborted = True
    assert set(done) == {"a", "c", "d"}
    for rid in done:
        assert done[rid] == greedy_reference(model, prompts[rid], 30)
    assert not engine.has_unfinished_requests()


def test_sampling_params_errors():
    cases = [
        (dict(temperature=-1), "temperature must be >= 0, got -1"),
        (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-2), "top_k must be -1 .* got -2"),
        (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
        (dict(stop=[""]), "stop must be a non-empty string"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be non-negative"),
        (dict(seed=1.5), "seed must be an integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    p = SamplingParams(temperature=0, top_k=5, top_p=0.5)
    assert p.greedy and p.top_k == -1 and p.top_p == 1.0 and SamplingParams(top_k=0).top_k == -1
    assert "temperature=1.0" in repr(SamplingParams())


def test_request_errors():
    model = llm()
    with pytest.raises(ValueError, match="the prompt has 130 tokens but max_model_len is 128"):
        model.generate({"prompt_token_ids": [5] * 130}, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate({"prompt_token_ids": []}, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match=r"got 2 SamplingParams for 3 prompts"):
        model.generate(["a", "b", "c"], [greedy(), greedy()], use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        model.generate({"prompt_token_ids": [500]}, greedy(), use_tqdm=False)
    assert not model.engine.has_unfinished_requests()  # nothing was queued by the refused calls


def heads_dir(vocab: int, hidden: int, n_predict: int = 3) -> str:
    d = tempfile.mkdtemp()
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=vocab, emb_dim=hidden, n_predict=n_predict)).save_pretrained(d)
    return d


def test_construction_errors():
    _, d = target("llama")
    base = dict(dtype="float64", max_model_len=64)
    with pytest.raises(ValueError, match=r"emb_dim = 48, but target .* has hidden size 32"):
        LLM(d, device=DEVICE, speculative_config={"model": heads_dir(128, 48), "method": "mlp_speculator"}, **base)
    with pytest.raises(ValueError, match=r"vocab_size = 100 tokens, but target .* has 128"):
        LLM(d, device=DEVICE, speculative_config={"model": heads_dir(100, 32), "method": "mlp_speculator"}, **base)
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be in 1..3 \(the heads' n_predict\), got 5"):
        LLM(d, device=DEVICE, speculative_config={"model": heads_dir(128, 32), "method": "mlp_speculator", "num_speculative_tokens": 5}, **base)
    other = save(tiny_target("llama", vocab_size=96).double(), tokenizer=False)
    with pytest.raises(ValueError, match=r"vocabulary of 96 tokens but target .* has 128"):
        LLM(d, device=DEVICE, speculative_config={"model": other, "method": "draft_model", "num_speculative_tokens": 2}, **base)
    with pytest.raises(ValueError, match="unknown speculative method 'eagle'"):
        LLM(d, device=DEVICE, speculative_config={"model": other, "method": "eagle"}, **base)
    with pytest.raises(ValueError, match=r"unknown speculative_config keys for draft_model: \['n_candidates'\]"):
        LLM(d, device=DEVICE, speculative_config={"model": other, "method": "draft_model", "num_speculative_tokens": 2, "n_candidates": 3}, **base)
    with pytest.raises(ValueError, match="needs num_speculative_tokens"):
        LLM(d, device=DEVICE, speculative_config={"model": other, "method": "draft_model"}, **base)
    with pytest.raises(ValueError, match="max_model_len 1000 is larger than the model's max_position_embeddings 512"):
        LLM(d, device=DEVICE, dtype="float64", max_model_len=1000)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(d, device=DEVICE, dtype="int8")
    # method inferred from the checkpoint
    inferred = LLM(d, device=DEVICE, speculative_config={"model": heads_dir(128, 32)}, **base)
    assert inferred.speculative_config["method"] == "mlp_speculator"


def test_no_tokenizer_needs_token_ids():
    _, d = target("qwen2")
    bare = tempfile.mkdtemp()
    for f in Path(d).iterdir():
        if "token" not in f.name and "chat" not in f.name and f.name != "special_tokens_map.json":
            (Path(bare) / f.name).write_bytes(f.read_bytes())
    model = LLM(bare, device=DEVICE, dtype="float64", max_model_len=64)
    assert model.get_tokenizer() is None
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        model.generate("hi", greedy(), use_tqdm=False)
    out = model.generate({"prompt_token_ids": [3, 4]}, greedy(5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.text == ""
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        model.generate({"prompt_token_ids": [3, 4]}, greedy(5, stop="x"), use_tqdm=False)


def test_engine_exported():
    assert LLMEngine is llm().engine.__class__
    assert torch.equal(llm().engine.state.active, torch.zeros_like(llm().engine.state.active))


def test_warmup_runs_every_step_shape_and_changes_no_output():
    """LLM.warmup visits every (batch bucket, sequence bucket, tree shape) up to its limits and leaves the engine as
    it was: the same greedy tokens afterwards; it refuses a busy engine."""
    _, d = target("llama")
    spec = {"model": d, "method": "draft_model", "num_speculative_tokens": 3}
    fresh = LLM(d, device=DEVICE, dtype="float64", max_model_len=128, max_num_seqs=4, speculative_config=spec)
    want = [o.outputs[0].token_ids for o in fresh.generate([PROMPT, "abc"], greedy(30), use_tqdm=False)]
    warmed = LLM(d, device=DEVICE, dtype="float64", max_model_len=128, max_num_seqs=4, speculative_config=spec)
    calls = []
    step = warmed.engine._step
    warmed.engine._step = lambda B, S, shape, mode: (calls.append((B, S, shape.name, mode)), step(B, S, shape, mode))[1]
    assert warmed.warmup(max_len=100, max_batch=2) >= 0
    visited = set(calls)
    shapes = {s.name for s in warmed.engine.shapes}
    assert {(B, S, sh) for B, S, sh, _ in visited} >= {(B, 128, sh) for B in (1, 2) for sh in shapes}
    assert all(B <= 2 for B, *_ in visited) and {m for *_, m in visited} == {"greedy"}
    assert all(warmed.engine.adaptive.latency.get((B, s)) for B in (1, 2) for s in warmed.engine.shapes)
    warmed.engine._step = step
    got = [o.outputs[0].token_ids for o in warmed.generate([PROMPT, "abc"], greedy(30), use_tqdm=False)]
    assert got == want
    warmed.engine.add_request("busy", [1, 2, 3], greedy(5))
    with pytest.raises(RuntimeError, match="idle engine"):
        warmed.warmup()


def test_warmup_skips_sequence_buckets_a_wide_tree_cannot_fit():
    """A tree of more verified tokens than the smallest sequence bucket (here 129 > 128) cannot run at that bucket:
    warm-up captured it anyway and wrote the tree's cache slots past the bucket (a device-side assert on the H100,
    2026-11-25). It warms only the buckets a real step can use, and decoding with the tree matches plain greedy."""
    _, d = target("llama")
    heads = heads_dir(128, 32, n_predict=4)
    spec = {"model": heads, "method": "mlp_speculator", "top_k_tokens_per_head": [10, 6, 4, 3], "n_candidates": 32,
            "adaptive": False}
    llm = LLM(d, device=DEVICE, dtype="float64", max_model_len=400, max_num_seqs=2, speculative_config=spec)
    tree = next(s for s in llm.engine.shapes if s.n_nodes == 129)
    calls = []
    step = llm.engine._step
    llm.engine._step = lambda B, S, shape, mode: (calls.append((B, S, shape.n_nodes)), step(B, S, shape, mode))[1]
    llm.warmup(max_len=200, max_batch=1)
    assert (1, 256, 129) in calls and all(S > n for _, S, n in calls)
    llm.engine._step = step
    plain = LLM(d, device=DEVICE, dtype="float64", max_model_len=400, max_num_seqs=2)
    want = plain.generate([PROMPT], greedy(40), use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate([PROMPT], greedy(40), use_tqdm=False)[0].outputs[0].token_ids == want
    assert set(llm.engine.stats["shapes"]) == {tree.name}


@pytest.mark.parametrize("spec_name", ["plain", "draft_self"])
def test_async_scheduling_changes_no_output(spec_name):
    """Launching step t + 1 before reading step t (the default) gives what reading every step first gives, with
    requests ending mid-flight by a stop token, a stop string, max_tokens and an abort, more requests than slots."""
    engine = llm(spec_name, max_num_seqs=2).engine
    probe = llm(spec_name, max_num_seqs=2).generate(PROMPT, greedy(30), use_tqdm=False)[0].outputs[0]
    stop_id = probe.token_ids[12]  # a token the continuation reaches mid-way
    stop_str = probe.text[5:7]
    requests = {
        "stop_id": (None, greedy(30, stop_token_ids=[stop_id])),
        "stop_str": (None, greedy(30, stop=[stop_str])),
        "short": ([9] * 7, greedy(5)),
        "long": ([20, 21], greedy(33)),
        "aborted": ([7, 8], greedy(40)),
        "one": ([5], greedy(1)),
    }

    def run(async_scheduling: bool):
        engine.async_scheduling = async_scheduling
        tok = engine.tokenizer
        for rid, (p, params) in requests.items():
            ids = p if p is not None else tok.encode(PROMPT)
            engine.add_request(rid, ids, params.clone(output_kind=RequestOutputKind.FINAL_ONLY))
        before = engine.stats["overlapped"]
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].text, out.outputs[0].finish_reason)
            steps += 1
            if steps == 4:
                engine.abort_request("aborted")
        return done, engine.stats["overlapped"] - before

    try:
        sync, overlapped_sync = run(False)
        overlapped, n_overlapped = run(True)
    finally:
        engine.async_scheduling = True
    assert overlapped_sync == 0 and n_overlapped > 5
    assert set(sync) == set(requests) - {"aborted"}
    assert overlapped == sync
    assert sync["stop_id"][2] == "stop" and len(sync["stop_id"][0]) <= 13
    assert sync["stop_str"][2] == "stop" and len(sync["short"][0]) == 5 and len(sync["long"][0]) == 33
