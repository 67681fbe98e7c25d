"""Shared by the parallelism tests: the smoke recipe, shortened, under `accelerate launch` with two CPU processes,
and comparisons of what two runs logged and saved."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 12 steps, stage 2 (the target's own continuations) from step 7, checkpoints every 4 steps, a loss per step.
SHORT = ("--max_steps", "12", "--stage2_start_step", "7", "--checkpoint_every", "4", "--eval_every", "0", "--log_every", "1")
TOL = dict(abs=1e-5, rel=1e-5)
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MLP_SPECULATORS_CACHE": "off"}


def launch(launch_args: list[str], out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """train/distill.py on the shortened smoke recipe under `accelerate launch LAUNCH_ARGS` (output in stdout)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        str(ROOT / "train/distill.py"), "--config", str(ROOT / "recipes/smoke-cpu.yaml"),
        "--output_dir", str(out), "--progress_bar", "false", *SHORT, *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def losses(out: Path) -> dict[int, list[float]]:
    """step -> [loss, head losses...] from train_log.jsonl (each step logged once)."""
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]
    by_step = {r["step"]: [r["loss"], *r["head_loss"]] for r in rows}
    assert len(by_step) == len(rows), "a step was logged twice"
    return by_step


def assert_same_losses(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], **TOL), f"step {step}"


def heads_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def assert_same_heads(got: Path, want: Path) -> None:
    want, got = heads_state(want), heads_state(got)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-2, rtol=1e-2, msg=k)  # bf16 as saved


def timed_run(launch_args: list[str], out: Path) -> tuple[Path, str, float]:
    """An uninterrupted run that must succeed: (output dir, its log, seconds)."""
    t0 = time.time()
    res = launch(launch_args, out)
    seconds = time.time() - t0
    assert res.returncode == 0, res.stdout[-4000:]
    return out, res.stdout, seconds
