"""Benchmark `speculators serve` against offline `LLM.generate` on the same prompts.

Measures, after a warm-up of each (compilation and CUDA graph capture are not timed):
    offline 1 stream    LLM.generate on one prompt at a time                     (the runtime's own speed)
    server  1 stream    one streaming client, one request at a time             (what HTTP + SSE cost on top)
    offline batch       LLM.generate on all requests at once (max_num_seqs slots) (the batching ceiling)
    server  N clients   N concurrent streaming clients (asyncio, openai client)  (continuous batching over HTTP)
Outputs are generated with ignore_eos, so every request produces exactly --max-tokens tokens in every mode.

    # GPU: starts the server itself (a subprocess), after the offline runs have freed the GPU
    python scripts/bench_server.py models/qwen2.5-coder-1.5b \\
        --speculative-config '{"model": "heads-dir", "method": "mlp_speculator", "num_speculative_tokens": 4}'
    # against a running server (offline rows need MODEL too; --skip-offline leaves them out)
    python scripts/bench_server.py MODEL --url http://127.0.0.1:8000 --skip-offline
    # CPU smoke test on a tiny model
    python scripts/bench_server.py TINY --device cpu --max-tokens 32 --num-requests 16 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

PROMPTS = [
    "def quicksort(arr):",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a process and a thread.",
    "import numpy as np\n\ndef softmax(x):",
    "The history of the printing press begins",
    "class LRUCache:\n    def __init__(self, capacity):",
    "Summarise the plot of Hamlet in three sentences.",
    "SELECT name, COUNT(*) FROM orders",
    "What are the main causes of inflation?",
    "fn main() {\n    let v: Vec<i32> =",
    "Translate to French: The weather is nice today.",
    "#include <stdio.h>\n\nint main(void) {",
    "Give three tips for writing readable code.",
    "async function fetchJson(url) {",
    "Describe how a hash map handles collisions.",
    "def merge_sorted(a, b):",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="target model dir / id (offline rows, and the server unless --url)")
    p.add_argument("--speculative-config", default=None, help="JSON, as for `speculators serve`")
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--api-key", default=None, help="for --url servers that need one")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="batch slots (default: --concurrency)")
    p.add_argument("--prompts", default=None, help="a file: one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="send prompts as user messages (chat completions / LLM.chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--single-requests", type=int, default=8, help="requests in the 1-stream rows")
    p.add_argument("--num-requests", type=int, default=64, help="requests in the concurrent rows")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default="bench_server.json")
    return p.parse_args()


def load_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(PROMPTS)
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
    return prompts


def row(name: str, requests: int, tokens: int, seconds: float, taus: list[float], ttft: list[float] | None = None) -> dict:
    return {"mode": name, "requests": requests, "tokens": tokens, "seconds": round(seconds, 4),
            "tok_per_s": round(tokens / seconds, 2) if seconds else 0.0,
            "tau": round(statistics.fmean(taus), 3) if taus else None,
            "ttft_ms_mean": round(1000 * statistics.fmean(ttft), 2) if ttft else None}


# ---- offline -------------------------------------------------------------------------------------------------------


def bench_offline(args, prompts: list[str], workload: list[str]) -> list[dict]:
    """The offline rows; the LLM lives only in `measure_offline`, so its memory is free for the server."""
    import torch

    rows = measure_offline(args, prompts, workload)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def measure_offline(args, prompts: list[str], workload: list[str]) -> list[dict]:
    import torch

    from speculators.infer import LLM, SamplingParams

    spec = json.loads(args.speculative_config) if args.speculative_config else None
    llm = LLM(args.model, speculative_config=spec, dtype=args.dtype, device=None if args.device == "auto" else args.device,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs or args.concurrency)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=0)

    def run(batch):
        if args.chat:
            return llm.chat([[{"role": "user", "content": p}] for p in batch], params, use_tqdm=False)
        return llm.generate(batch, params, use_tqdm=False)

    def sync():
        if llm.device.type == "cuda":
            torch.cuda.synchronize()

    # Every decode step the runs below can meet, captured ahead (as the server does at startup), then the
    # prefill paths: no timed request pays for compilation or capture.
    llm.warmup(max_len=args.max_tokens + max(len(ids) for ids in llm.get_tokenizer()(workload)["input_ids"]) + 64,
               sampling=args.temperature > 0)
    run(prompts[:1])
    run(prompts[:2])
    run(workload)
    sync()
    seconds, tokens, taus = 0.0, 0, []
    for p in prompts[: args.single_requests]:
        start = time.perf_counter()
        out = run([p])[0]
        sync()
        seconds += time.perf_counter() - start
        tokens += len(out.outputs[0].token_ids)
        taus.append(out.metrics.mean_tokens_per_step)
    rows = [row("offline 1 stream", args.single_requests, tokens, seconds, taus)]
    start = time.perf_counter()
    outs = run(workload)
    sync()
    seconds = time.perf_counter() - start
    rows.append(row(f"offline batch ({llm.engine.n_slots} slots)", len(outs), sum(len(o.outputs[0].token_ids) for o in outs),
                    seconds, [o.metrics.mean_tokens_per_step for o in outs]))
    return rows


# ---- server --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_server(args):
    """Yield (base url, api key): --url as given, or a `speculators serve` subprocess on a free port."""
    if args.url:
        yield args.url.rstrip("/"), args.api_key or "EMPTY"
        return
    port = free_port()
    cmd = [sys.executable, "-m", "speculators.infer.server", args.model, "--port", str(port), "--dtype", args.dtype,
           "--device", args.device, "--max-num-seqs", str(args.max_num_seqs or args.concurrency), "--log-level", "warning",
           "--warmup-len", str(args.max_tokens + 512)]  # prompts here are short; 512 covers a chat template
    if args.speculative_config:
        cmd += ["--speculative-config", args.speculative_config]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    log = tempfile.NamedTemporaryFile("w+", prefix="bench_server_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; its log: {log.name}\n{open(log.name).read()[-4000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {args.startup_timeout:.0f} s; its log: {log.name}")
            time.sleep(0.5)
        yield url, "EMPTY"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def one_request(client, model: str, prompt: str, args) -> tuple[int, float, float, float | None]:
    """(completion tokens, seconds, time to first token, tau) of one streaming request."""
    kwargs = dict(model=model, max_tokens=args.max_tokens, temperature=args.temperature, seed=0, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    start = time.perf_counter()
    if args.chat:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
    else:
        stream = await client.completions.create(prompt=prompt, **kwargs)
    first, tokens, tau = None, 0, None
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        spec = (chunk.model_extra or {}).get("speculative")
        if spec:
            tau = spec["mean_tokens_per_step"]
    return tokens, time.perf_counter() - start, first or 0.0, tau


async def bench_server_async(url: str, key: str, args, prompts: list[str], workload: list[str]) -> list[dict]:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=3600) as client:
        model = (await client.models.list()).data[0].id
        gate = asyncio.Semaphore(args.concurrency)

        async def gated(p):
            async with gate:
                return await one_request(client, model, p, args)

        for p in prompts[:2]:  # warm-up, as offline
            await one_request(client, model, p, args)
        await asyncio.gather(*(gated(p) for p in workload))

        singles = [await one_request(client, model, p, args) for p in prompts[: args.single_requests]]
        rows = [row("server 1 stream", len(singles), sum(s[0] for s in singles), sum(s[1] for s in singles),
                    [s[3] for s in singles if s[3] is not None], [s[2] for s in singles])]
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(p) for p in workload))
        seconds = time.perf_counter() - start
        rows.append(row(f"server {args.concurrency} clients", len(results), sum(r[0] for r in results), seconds,
                        [r[3] for r in results if r[3] is not None], [r[2] for r in results]))
        latencies = sorted(r[1] for r in results)
        rows[-1]["latency_s_p50"] = round(latencies[len(latencies) // 2], 3)
        rows[-1]["latency_s_p95"] = round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)
    return rows


def main() -> int:
    args = parse_args()
    prompts = load_prompts(args.prompts)
    prompts = (prompts * (args.single_requests // len(prompts) + 1))[: max(args.single_requests, len(prompts))]
    workload = [prompts[i % len(prompts)] for i in range(args.num_requests)]
    rows = [] if args.skip_offline else bench_offline(args, prompts, workload)
    with started_server(args) as (url, key):
        rows += asyncio.run(bench_server_async(url, key, args, prompts, workload))
    order = {"offline 1 stream": 0, "server 1 stream": 1}
    rows.sort(key=lambda r: order.get(r["mode"], 2 + r["mode"].startswith("server")))

    print(f"{'mode':<26}{'requests':>9}{'tokens':>9}{'seconds':>10}{'tok/s':>10}{'tau':>7}{'TTFT ms':>9}")
    for r in rows:
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        ttft = "" if r["ttft_ms_mean"] is None else f"{r['ttft_ms_mean']:.1f}"
        print(f"{r['mode']:<26}{r['requests']:>9}{r['tokens']:>9}{r['seconds']:>10.2f}{r['tok_per_s']:>10.1f}{tau:>7}{ttft:>9}")
    by = {r["mode"].split(" (")[0]: r for r in rows}
    summary = {}
    if "offline 1 stream" in by and "server 1 stream" in by:
        summary["server_1_stream_vs_offline"] = round(by["server 1 stream"]["tok_per_s"] / by["offline 1 stream"]["tok_per_s"], 3)
        print(f"server / offline, 1 stream: {summary['server_1_stream_vs_offline']:.3f}")
    if "offline batch" in by and f"server {args.concurrency} clients" in by:
        ratio = by[f"server {args.concurrency} clients"]["tok_per_s"] / by["offline batch"]["tok_per_s"]
        summary["server_concurrent_vs_offline_batch"] = round(ratio, 3)
        print(f"server {args.concurrency} clients / offline batch: {ratio:.3f}")

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "host": platform.node()}
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    with open(args.out, "w") as f:
        json.dump({"config": config, "env": env, "rows": rows, "summary": summary}, f, indent=2)
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
