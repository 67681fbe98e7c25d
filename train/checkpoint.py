"""Atomic, resumable checkpoints: output_dir/checkpoints/step_00000100/.

A checkpoint is written as `step_00000100.tmp/` and renamed to `step_00000100/` only after every rank has written
its part, so a directory without the suffix is complete by construction: a kill at any moment leaves at worst a
`.tmp` directory, which resume ignores and the next save removes. Old checkpoints are renamed to `.deleting`
before removal for the same reason. Layout of one checkpoint:

    (accelerate save_state)  model.safetensors / optimizer.bin / random_states_{rank}.pkl   (DDP, single GPU)
                             pytorch_model_fsdp_0/, optimizer_0/                            (FSDP2, sharded)
                             pytorch_model/ (DeepSpeed engine dir)                          (DeepSpeed)
    trainer_state.json       step, tokens, scheduler, world size (rank 0)
    rank_{r}.pt              this rank's data position and stage-2 pool
    heads/                   the heads as `save_pretrained` writes them (bf16): a run cut off at any moment
                             still leaves heads to evaluate or serve (`LLM(..., speculative_config={"model": .../heads})`)

accelerate knows each backend's layout (sharded FSDP2 state dicts, DeepSpeed's engine files), so the heads and
the optimizer go through it; what is per rank (the data iterator, the stage-2 pool) is written per rank, since
accelerate's custom-object checkpointing only saves rank 0's objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _test_hook(name: str, step: int) -> None:
    """Tests kill the process hard at chosen points (SPECULATORS_TEST_EXIT_*=step)."""
    if os.environ.get(name) == str(step):
        os._exit(3)


class CheckpointManager:
    def __init__(self, accelerator, output_dir: str | os.PathLike, keep: int):
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, shared: dict, rank_state: dict, export: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint `step`; `export(tmp_dir)` runs on every rank (gathers may be collective) before the rename."""
        acc = self.accelerator
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save(rank_state, tmp / f"rank_{acc.process_index}.pt")
        if export is not None:
            export(tmp)
        _test_hook("SPECULATORS_TEST_EXIT_DURING_SAVE", step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = dict(shared, step=step, world_size=acc.num_processes)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (a run restarted with resume: none): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                gone = old.with_name(old.name + ".deleting")
                os.replace(old, gone)
                shutil.rmtree(gone, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str | os.PathLike) -> tuple[dict, dict]:
        """Restore heads, optimizer and RNG states through accelerate; return (shared state, this rank's state)."""
        acc = self.accelerator
        path = Path(path)
        shared = json.loads((path / "trainer_state.json").read_text())
        if shared["world_size"] != acc.num_processes:
            raise ValueError(
                f"checkpoint {path} was written by {shared['world_size']} processes, this job has {acc.num_processes}: "
                "the data order is per process, so resume with the same number of processes"
            )
        acc.load_state(str(path))
        rank_state = torch.load(path / f"rank_{acc.process_index}.pt", weights_only=False)
        return shared, rank_state
