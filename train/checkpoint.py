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

Checkpoints move between DDP / single GPU and FSDP2 (same number of processes): when the layout on disk is not the
one this job writes, the heads and the optimizer state are read through torch.distributed.checkpoint's state-dict
API, which knows plain, DDP and FSDP2 modules alike (`_load_across`); everything else in a checkpoint is the same
under every backend. DeepSpeed checkpoints only resume under DeepSpeed.
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
        found, mine = checkpoint_layout(path), job_layout(acc)
        if found == mine:
            acc.load_state(str(path))
        elif {found, mine} <= set(PORTABLE):
            acc.print(f"[resume] {path.name} was written under {PORTABLE[found]}; loading its heads and optimizer "
                      f"state into this {PORTABLE[mine]} job")
            _load_across(acc, path, found)
        else:
            raise ValueError(
                f"checkpoint {path} has the {found!r} layout and this job writes {mine!r}: only DDP / single-GPU "
                "('full') and FSDP2 SHARDED_STATE_DICT ('sharded') checkpoints resume under each other"
            )
        rank_state = torch.load(path / f"rank_{acc.process_index}.pt", weights_only=False)
        return shared, rank_state


PORTABLE = {"full": "DDP / single GPU", "sharded": "FSDP2"}


def checkpoint_layout(path: Path) -> str:
    """How accelerate's save_state laid out the heads and optimizer in checkpoint `path`."""
    if (path / "pytorch_model_fsdp_0").is_dir():
        return "sharded"  # FSDP SHARDED_STATE_DICT: torch.distributed.checkpoint directories
    if (path / "pytorch_model_fsdp.bin").is_file():
        return "fsdp-full"  # FSDP FULL_STATE_DICT
    if (path / "pytorch_model").is_dir():
        return "deepspeed"
    if (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file():
        return "full"  # no / DDP backend: model.safetensors + optimizer.bin
    return "unknown"


def job_layout(acc) -> str:
    """The layout this job's save_state writes (see checkpoint_layout)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import StateDictType

        return "sharded" if acc.state.fsdp_plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT else "fsdp-full"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "full"


def _load_across(acc, path: Path, found: str) -> None:
    """Heads + optimizer from a checkpoint of the other layout ('full' <-> 'sharded'), then what acc.load_state
    restores besides them (RNG states, grad scaler, accelerate's step counter), from the same files.

    'sharded' -> DDP / single: torch.distributed.checkpoint reads the shards into whole tensors.
    'full' -> FSDP2: the whole tensors are read on every rank and each rank keeps its shard (full_state_dict).
    Both go through the FQN-keyed state dicts of torch.distributed.checkpoint.state_dict; the optimizer file of
    a 'full' checkpoint is keyed by parameter index, mapped to names by this job's optimizer, which the trainer
    builds in the same order under every backend (shapes are checked).
    """
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    if len(acc._models) != 1 or len(acc._optimizers) != 1:
        raise ValueError("a checkpoint of another layout loads into exactly one prepared model and optimizer")
    model, opt = acc._models[0], acc._optimizers[0].optimizer
    acc.wait_for_everyone()
    if found == "sharded":
        sd = get_model_state_dict(model)
        dcp.load({"model": sd}, checkpoint_id=path / "pytorch_model_fsdp_0")
        set_model_state_dict(model, sd)
        osd = get_optimizer_state_dict(model, opt)  # initialises the optimizer state, then filled in place
        dcp.load({"optimizer": osd}, checkpoint_id=path / "optimizer_0")
        set_optimizer_state_dict(model, opt, osd)
    else:
        full = StateDictOptions(full_state_dict=True)
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file

            sd = load_file(path / "model.safetensors")
        else:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        set_model_state_dict(model, {k.removeprefix("module."): v for k, v in sd.items()}, options=full)
        by_index = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, opt, _optimizer_by_name(by_index, model, opt), options=full)
    override = load_accelerator_state(str(path), [], [], [], [], acc.process_index, acc.scaler)
    if "step" in override:
        acc.step = override["step"]
    acc.wait_for_everyone()


def _optimizer_by_name(state: dict, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` (parameters by index) -> the FQN-keyed form of torch.distributed.checkpoint."""
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    shapes = {names[id(p)]: tuple(p.shape) for g in opt.param_groups for p in g["params"]}  # global shapes (DTensor)
    if [len(g["params"]) for g in state["param_groups"]] != [len(g) for g in groups]:
        raise ValueError("the checkpoint's optimizer has other parameter groups than this job's")
    fqn = {i: n for g_saved, g in zip(state["param_groups"], groups) for i, n in zip(g_saved["params"], g)}
    out = {"state": {}, "param_groups": []}
    for i, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != shapes[fqn[i]]:
                raise ValueError(f"optimizer state {k} of {fqn[i]} has shape {tuple(v.shape)}, the parameter {shapes[fqn[i]]}")
        out["state"][fqn[i]] = st
    for g_saved in state["param_groups"]:
        out["param_groups"].append({**g_saved, "params": [fqn[i] for i in g_saved["params"]]})
    return out
