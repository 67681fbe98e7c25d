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

Checkpoints move between DDP / single GPU, FSDP2 and DeepSpeed (same number of processes): when the layout on disk
is not the one this job writes, the heads and the optimizer state are read through torch.distributed.checkpoint's
state-dict API, which knows plain, DDP and FSDP2 modules alike or, with DeepSpeed on either side,
as whole fp32 tensors per parameter name (`_load_across`); everything else in a checkpoint is the same
under every backend.
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
            _load_across(acc, path, found, mine)
        else:
            raise ValueError(
                f"checkpoint {path} has the {found!r} layout and this job writes {mine!r}: only DDP / single-GPU "
                "('full'), FSDP2 SHARDED_STATE_DICT ('sharded') and DeepSpeed checkpoints resume under each other"
            )
        rank_state = torch.load(path / f"rank_{acc.process_index}.pt", weights_only=False)
        return shared, rank_state


PORTABLE = {"full": "DDP / single GPU", "sharded": "FSDP2", "deepspeed": "DeepSpeed"}


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


def _load_across(acc, path: Path, found: str, mine: str) -> None:
    """Heads + optimizer from a checkpoint of another layout, then what acc.load_state restores besides them (RNG
    states, grad scaler, accelerate's step counter), from the same files.

    'full' <-> 'sharded' (DDP / single <-> FSDP2): through the FQN-keyed state dicts of
    torch.distributed.checkpoint.state_dict. 'sharded' -> DDP / single: torch.distributed.checkpoint reads the shards
    into whole tensors; 'full' -> FSDP2: the whole tensors are read on every rank and each rank keeps its shard.
    With DeepSpeed (ZeRO-1/2: the heads never train under ZeRO-3) on either side: the heads' whole state as plain
    tensors, {name: fp32 parameter}, {name: {"exp_avg", "exp_avg_sq"}} and Adam's step, cut out of or written into
    DeepSpeed's flat partitions.
    """
    from accelerate.checkpointing import load_accelerator_state

    if len(acc._models) != 1 or len(acc._optimizers) != 1:
        raise ValueError("a checkpoint of another layout loads into exactly one prepared model and optimizer")
    acc.wait_for_everyone()
    if found == "deepspeed":
        _set_torch_state(acc, *_read_deepspeed(path / "pytorch_model"))
    elif mine == "deepspeed":
        _set_deepspeed_state(acc, *_read_torch_state(acc, path, found))
    else:
        _load_full_sharded(acc, path, found)
    override = load_accelerator_state(str(path), [], [], [], [], acc.process_index, acc.scaler)
    if "step" in override:
        acc.step = override["step"]
    acc.wait_for_everyone()


def _param_names(module: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its name as every layout writes it (no DDP / DeepSpeed `module.` prefix)."""
    return {id(p): n.removeprefix("module.") for n, p in module.named_parameters()}


def _named_groups(module: torch.nn.Module, groups) -> list[list[str]]:
    """Parameter names per group, for groups given as lists of `module`'s parameters."""
    names = _param_names(module)
    return [[names[id(p)] for p in group] for group in groups]


def _read_full_model(path: Path) -> dict[str, torch.Tensor]:
    """The heads' whole state dict from a 'full' checkpoint, names without the `module.` prefix."""
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(path / "model.safetensors")
    else:
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _optimizer_by_name(state: dict, groups: list[list[str]], shapes: dict[str, tuple]) -> dict:
    """`optimizer.state_dict()` (parameters by index) -> the FQN-keyed form of torch.distributed.checkpoint.

    `groups`: this job's parameter names per optimizer group, which the trainer builds in the same order under
    every backend; `shapes`: their global shapes, checked against the saved state."""
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


def _load_full_sharded(acc, path: Path, found: str) -> None:
    """'sharded' -> DDP / single, or 'full' -> FSDP2 (see _load_across)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    model, opt = acc._models[0], acc._optimizers[0].optimizer
    if found == "sharded":
        sd = get_model_state_dict(model)
        dcp.load({"model": sd}, checkpoint_id=path / "pytorch_model_fsdp_0")
        set_model_state_dict(model, sd)
        osd = get_optimizer_state_dict(model, opt)  # initialises the optimizer state, then filled in place
        dcp.load({"optimizer": osd}, checkpoint_id=path / "optimizer_0")
        set_optimizer_state_dict(model, opt, osd)
    else:
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, _read_full_model(path), options=full)
        by_index = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
        shapes = {n.removeprefix("module."): tuple(p.shape) for n, p in model.named_parameters()}  # global (DTensor)
        by_name = _optimizer_by_name(by_index, _named_groups(model, [g["params"] for g in opt.param_groups]), shapes)
        set_optimizer_state_dict(model, opt, by_name, options=full)


def _read_deepspeed(engine_dir: Path):
    """Whole fp32 parameters and Adam moments from DeepSpeed's ZeRO-1/2 files: each rank's flat fp32 partition of
    every parameter group (and the base optimizer's moments over it), joined and cut per parameter as DeepSpeed's
    own zero_to_fp32 does for the parameters."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(str(engine_dir)))
    files = z.get_optim_files(str(engine_dir))
    opt = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    if opt[0].get("zero_stage", 0) > 2 or "single_partition_of_fp32_groups" not in opt[0]:
        raise ValueError(f"{engine_dir}: only ZeRO stage 1/2 optimizer states of the heads convert to other layouts")
    counts = opt[0]["partition_count"]
    world = max(counts) if isinstance(counts, list) else counts
    if world != len(files):
        raise ValueError(f"{engine_dir}: {len(files)} optimizer partitions for a world of {world}")
    paddings = opt[0].get("param_alignment_paddings")

    def per_name(flat_groups) -> dict:
        out: dict = {}
        z._zero2_merge_trainable_params(out, world, flat_groups, model_states, paddings)
        return {k.removeprefix("module."): v.clone() for k, v in out.items()}

    params = per_name([o["single_partition_of_fp32_groups"] for o in opt])
    base = [o["base_optimizer_state"] for o in opt]
    groups = len(opt[0]["single_partition_of_fp32_groups"])
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        # The moments cover each rank's padded partition; the saved fp32 partitions have the padding cut off.
        flat = [[b["state"][g][key][: o["single_partition_of_fp32_groups"][g].numel()] for g in range(groups)]
                for b, o in zip(base, opt)]
        for name, value in per_name(flat).items():
            moments.setdefault(name, {})[key] = value
    step = base[0]["state"][0]["step"]
    return params, moments, float(step)


def _read_torch_state(acc, path: Path, found: str):
    """Whole fp32 parameters, Adam moments and step from a DDP ('full') or FSDP2 ('sharded') checkpoint, keyed by
    name, for this DeepSpeed job (its module has the same names: both wrap the same Student)."""
    engine = acc._models[0]
    shapes = {n.removeprefix("module."): tuple(p.shape) for n, p in engine.module.named_parameters()}
    if found == "full":
        params = {k: v.float() for k, v in _read_full_model(path).items() if k in shapes}
        by_index = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
        # DeepSpeed keeps the client optimizer's groups, in order, as bit16_groups.
        by_name = _optimizer_by_name(by_index, _named_groups(engine.module, engine.optimizer.bit16_groups), shapes)["state"]
    else:
        import torch.distributed.checkpoint as dcp

        params = {n: torch.empty(s, dtype=torch.float32) for n, s in shapes.items()}
        dcp.load({"model": params}, checkpoint_id=path / "pytorch_model_fsdp_0")
        by_name = {n: {"step": torch.zeros(()), "exp_avg": torch.empty(s), "exp_avg_sq": torch.empty(s)} for n, s in shapes.items()}
        dcp.load({"optimizer": {"state": by_name}}, checkpoint_id=path / "optimizer_0")
    moments = {n: {"exp_avg": st["exp_avg"].float(), "exp_avg_sq": st["exp_avg_sq"].float()} for n, st in by_name.items()}
    steps = {float(st["step"]) for st in by_name.values()}
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's parameters were stepped unequally often: {sorted(steps)}")
    for n, v in params.items():
        if tuple(v.shape) != shapes[n]:
            raise ValueError(f"{n} has shape {tuple(v.shape)} in the checkpoint, {shapes[n]} in this job")
    return params, moments, steps.pop()


def _set_deepspeed_state(acc, params: dict, moments: dict, step: float) -> None:
    """Into a DeepSpeed ZeRO-1/2 engine: the module's (full) weights, each rank's fp32 master partition, and the base
    optimizer's moments over it, written fragment by fragment through DeepSpeed's parameter-to-partition maps."""
    from deepspeed.utils import safe_set_full_fp32_param

    engine = acc._models[0]
    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ValueError(f"{type(zero).__name__}: only ZeRO stage 1/2 heads load a checkpoint of another layout")
    names = _param_names(engine.module)
    missing = sorted(set(names.values()) - set(params))
    if missing:
        raise ValueError(f"the checkpoint lacks the heads' parameters {missing}")
    with torch.no_grad():
        for p in engine.module.parameters():
            value = params[names[id(p)]].to(p.device)
            p.copy_(value.to(p.dtype))
            safe_set_full_fp32_param(p, value)
        base = zero.optimizer
        for flat, group in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups):
            # torch's rule (Optimizer.load_state_dict): fused / capturable Adam keeps `step` on the parameter's device.
            options = next((g for g in base.param_groups if any(q is flat for q in g["params"])), {})
            device = flat.device if options.get("fused") or options.get("capturable") else "cpu"
            state = {"step": torch.tensor(step, dtype=torch.float32, device=device)}
            for key in ("exp_avg", "exp_avg_sq"):
                buf = torch.zeros_like(flat)
                for p in group:
                    m = getattr(p, "_hp_mapping", None)
                    if m is None:  # no fragment of this parameter in this rank's partition
                        continue
                    lp, hp = m.lp_fragment_address, m.hp_fragment_address
                    src = moments[names[id(p)]][key].to(buf.device).flatten()
                    buf.narrow(0, hp.start, hp.numel).copy_(src.narrow(0, lp.start, lp.numel))
                state[key] = buf
            base.state[flat] = state


def _set_torch_state(acc, params: dict, moments: dict, step: float) -> None:
    """Into a DDP / FSDP2 job: whole tensors through torch.distributed.checkpoint's state-dict API (each FSDP2 rank
    keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    model, opt = acc._models[0], acc._optimizers[0].optimizer
    full = StateDictOptions(full_state_dict=True)
    groups = _named_groups(model, [g["params"] for g in opt.param_groups])
    wanted = [n for g in groups for n in g]  # one order on every rank: the loads below are collective under FSDP2
    if set(wanted) - set(params):
        raise ValueError(f"the checkpoint lacks the heads' parameters {sorted(set(wanted) - set(params))}")
    set_model_state_dict(model, {n: params[n] for n in wanted}, options=full)
    osd = {
        "state": {n: {"step": torch.tensor(step, dtype=torch.float32), **moments[n]} for n in wanted},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g, names in zip(opt.param_groups, groups)],
    }
    set_optimizer_state_dict(model, opt, osd, options=full)
