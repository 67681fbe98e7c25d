"""Training throughput against the frozen target's own forward, on the same batches.

    python scripts/bench_train.py --config recipes/qwen2.5-coder-1.5b.yaml [--key value ...] [--steps 20 --warmup 5]
    python scripts/bench_train.py --config recipes/smoke-cpu.yaml          # CPU, tiny random target

Prints (a) target-forward-only tokens/s (a plain forward with full logits: what running the target costs),
(b) full training-step tokens/s (target forward + heads + fused loss + backward + optimizer), and b / a.
The goal on an H100 for the 1.5B target is b / a >= 0.75: the heads should cost at most a third of the target.
Extra `--key value` pairs override recipe keys (e.g. --batch_size 8 --seq_len 2048 --loss soft).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batches, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (compile, allocator, autotune)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--profile", default=None, help="profile 2 training steps; write the kernel table to this file")
    parser.add_argument("--random-tokens", action="store_true",
                        help="time on random token rows of the recipe's shape (random-weight targets at real sizes)")
    args, rest = parser.parse_known_args(argv)

    from speculators.train.config import load_config
    from speculators.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        overrides = ["--output_dir", tmp, "--resume", "none", "--wandb", "disabled", "--eval_every", "0",
                     "--checkpoint_every", "0", "--progress_bar", "false", "--stage2_start_step", "null",
                     "--max_steps", str(10**9)]
        cfg = load_config(rest + overrides)
        trainer = Trainer(cfg)
        device = trainer.accelerator.device
        n_batches = (args.warmup + args.steps) * cfg.grad_accum
        if args.random_tokens:
            g = torch.Generator().manual_seed(0)
            shape = (cfg.batch_size, cfg.seq_len + cfg.n_predict + 1)
            vocab = trainer.heads.config.vocab_size
            batches = [torch.randint(0, vocab, shape, generator=g).to(device) for _ in range(min(n_batches, 16))]
        else:
            batches = [next(trainer.train_batches).to(device) for _ in range(min(n_batches, 64))]
        feed = itertools.cycle(batches)
        trainer.train_batches = feed  # train_step draws from here: the same batches for both measurements
        T = cfg.seq_len
        tokens_per_batch = batches[0].size(0) * T

        model = trainer.teacher.module

        @torch.no_grad()
        def target_forward(ids):
            model(input_ids=ids[:, : T + cfg.n_predict], use_cache=False)

        warm = [next(feed) for _ in range(args.warmup * cfg.grad_accum)]
        timed(target_forward, warm, device)
        timed_batches = [next(feed) for _ in range(args.steps * cfg.grad_accum)]
        fwd_s = timed(target_forward, timed_batches, device)

        for _ in range(args.warmup):
            trainer.train_step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        sync(device)
        step_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(2):
                    trainer.train_step()
                sync(device)
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            with open(args.profile, "w") as f:
                f.write(prof.key_averages().table(sort_by=sort, row_limit=60))

        fwd_tps = tokens_per_batch * len(timed_batches) / fwd_s
        step_tps = tokens_per_batch * args.steps * cfg.grad_accum / step_s
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "target": cfg.target, "batch_size": cfg.batch_size, "seq_len": T, "n_predict": cfg.n_predict,
            "draft_vocab_size": cfg.draft_vocab_size, "loss": cfg.loss, "teacher_path": trainer.teacher.hidden_from,
            "soft_from": trainer.teacher.soft_from, "compile": cfg.compile,
            "target_forward_tokens_per_s": fwd_tps, "train_step_tokens_per_s": step_tps, "ratio": step_tps / fwd_tps,
            "peak_gib": peak,
        }
        if trainer.accelerator.is_main_process:
            print(f"(a) target forward only : {fwd_tps:12,.0f} tokens/s")
            print(f"(b) full training step  : {step_tps:12,.0f} tokens/s")
            print(f"ratio b / a             : {step_tps / fwd_tps:.3f}   (goal >= 0.75 on H100, 1.5B target)")
            print(json.dumps(result))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
