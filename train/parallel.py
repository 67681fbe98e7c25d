"""Parallelism, applied from outside the models: the heads train data-parallel, the frozen target is replicated
(single GPU, DDP) or sharded (FSDP2, DeepSpeed ZeRO-3) across the job's GPUs.

Only the heads go through `accelerator.prepare`: accelerate checkpoints every model it prepared (save_state walks
`accelerator._models`), so a prepared target would be written into every checkpoint, and under FSDP2 accelerate
prepares one model per job anyway. The target is placed here instead:

- no / DDP backend: moved to the device whole; nothing to synchronise, it has no gradients.
- FSDP2: `accelerate.utils.fsdp2_prepare_model`, the same sharding accelerate applies (one unit per decoder
  layer, embeddings, tail, root) with the launch config's settings, but outside `_models`. The heads are then
  prepared by accelerate as one FSDP2 unit (they are small; gradients reduce-scatter like any FSDP model).
- DeepSpeed: the launch config's ZeRO stage decides the target's layout. Stage 3 shards the target with its own
  inference-only ZeRO-3 engine (`deepspeed.initialize` without optimizer; this is what accelerate's
  multi-plugin teacher/student support does, minus the teacher landing in every checkpoint); the heads train under
  ZeRO stage min(stage, 2), because ZeRO-3 only gathers a parameter when its own module's forward runs, and the
  fused loss reads the output layers' weights directly.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from speculators.train.config import TrainConfig


@dataclass
class Parallel:
    """How this job is laid out: the accelerator, the backend's name, and whether the target is sharded."""

    accelerator: object
    backend: str  # "single", "ddp", "fsdp2" or "deepspeed"
    shard_target: bool
    teacher_ds_config: dict | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return cfg.mixed_precision


def build_parallel(cfg: TrainConfig) -> Parallel:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    mp = resolve_mixed_precision(cfg)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun-launched processes on a machine without CUDA: CPU processes over gloo (tests, laptops).
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return _build_deepspeed(cfg, mp)

    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum)
    if (acc.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        _fsdp_on_cpu(acc)
    if acc.is_fsdp2:
        return Parallel(acc, "fsdp2", shard_target=acc.num_processes > 1)
    if acc.distributed_type == DistributedType.FSDP:
        raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp2.yaml)")
    backend = "single" if acc.num_processes == 1 else "ddp"
    return Parallel(acc, backend, shard_target=False)


def _build_deepspeed(cfg: TrainConfig, mp: str) -> Parallel:
    """The DeepSpeed backend. The launch config (yaml keys or its deepspeed_config_file) decides the ZeRO stage and
    the offload devices; the heads' micro batch, gradient accumulation and clipping are the recipe's (batch_size,
    grad_accum, grad_clip), not the launch yaml's gradient_accumulation_steps / gradient_clipping."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from speculators.train.models import target_dtype

    launch = DeepSpeedPlugin()  # the launch config's settings (yaml keys or a deepspeed_config_file)
    stage = int(launch.zero_stage)
    zero = {
        "stage": min(stage, 2),
        "overlap_comm": True,
        "offload_optimizer": _offload(launch.offload_optimizer_device, launch.offload_optimizer_nvme_path),
    }
    student = _plugin({
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16"},
    })
    teacher = None
    if stage == 3:
        dtype = target_dtype(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        teacher = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {
                "stage": 3,
                "overlap_comm": True,
                "offload_param": _offload(launch.offload_param_device, launch.offload_param_nvme_path),
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
            },
            # The engine casts the module to the enabled half type: keep the target in the dtype it was built in.
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
        }
    acc = Accelerator(deepspeed_plugin=student, mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum)
    if acc.distributed_type == DistributedType.MULTI_CPU:
        _deepspeed_on_cpu(acc, student, mp)
    return Parallel(acc, "deepspeed", shard_target=stage == 3, teacher_ds_config=teacher)


def _offload(device: str | None, nvme_path: str | None) -> dict:
    device = (device or "none").lower()
    return {"device": device, "nvme_path": nvme_path} if device == "nvme" else {"device": device}


def _plugin(ds_config: dict):
    """`DeepSpeedPlugin(hf_ds_config=ds_config)`, built next to a launch config that has DeepSpeed keys.

    accelerate launch lists the launch config's deepspeed_config keys in ACCELERATE_CONFIG_DS_FIELDS, and a plugin
    built from a config dict refuses to start while any of them is set ("When using `deepspeed_config_file`, the
    following accelerate config variables will be ignored: [...]"): a check meant for a user's launch yaml that
    names both a deepspeed_config_file and the keys that file overrides. This config is written here, from the
    recipe and the launch settings already read (zero_stage, offload devices), so the check is off while the plugin
    is built; the launch environment is left as it was. Every value is given (no "auto"), so the ACCELERATE_*
    values accelerate still reads in the plugin (gradient accumulation, clipping) change nothing;
    zero3_init_flag is given too: the heads never train under ZeRO-3.
    """
    from accelerate.utils import DeepSpeedPlugin

    saved = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        return DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=False)
    finally:
        if saved is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = saved


def _deepspeed_on_cpu(acc, plugin, mp: str) -> None:
    """A DeepSpeed launch config on CPU processes (tests, laptops: deepspeed-zero2.yaml with --num_processes 2).

    As with FSDP (_fsdp_on_cpu): accelerate (1.15) switches to DeepSpeed only for accelerator devices; CPU
    processes (ACCELERATE_USE_CPU, set above when there is no CUDA) stay MULTI_CPU and the plugin goes unused.
    DeepSpeed itself runs on CPU (its CPU accelerator, gloo), so the state is switched here as AcceleratorState
    does on GPUs: DeepSpeed's communication layer on the process group accelerate set up, the plugin selected
    with the job's mixed precision, the precision then left to DeepSpeed's config.
    """
    import deepspeed
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps the existing process group
    state = acc.state
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    plugin.set_mixed_precision(mp)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    if mp != "fp8":
        state._mixed_precision = "no"  # DeepSpeed's config holds the precision (AcceleratorState.mixed_precision)
    acc.native_amp, acc.scaler = False, None  # as Accelerator sets them under DeepSpeed


def _fsdp_on_cpu(acc) -> None:
    """An FSDP launch config on CPU processes (tests, laptops: recipes/accelerate/cpu-2proc-fsdp2.yaml).

    accelerate (1.15) builds the FSDP plugin from the launch config but switches its state to FSDP only for
    accelerator devices (MULTI_GPU, MULTI_XPU, ...): on CPU processes it stays MULTI_CPU, i.e. DDP, without a word.
    torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, so the state is switched here, as accelerate would
    have done on GPUs (the process group, gloo, and the CPU device are already set up as for MULTI_CPU).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # the launch config's settings (FSDP_* environment variables)
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp2.yaml)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    # As AcceleratorState.__init__ ends on GPUs: every later AcceleratorState() copies PartialState's type back.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


@contextlib.contextmanager
def _own_wrap_policy(plugin):
    """accelerate's FSDP plugin remembers the first model's layer classes; keep the target's choice to itself."""
    saved = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
    try:
        yield
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved


def prepare_heads(par: Parallel, student: nn.Module, optimizer: torch.optim.Optimizer):
    """`accelerator.prepare(student, optimizer)`, with FSDP2's cpu_ram_efficient_loading off for the heads.

    With it on, accelerate (1.15) broadcasts rank 0's state dict into the shards and expects every entry to be a
    sharded parameter; the heads' persistent `draft_to_target` buffer is a plain tensor, and accelerate fails with
    "'Tensor' object has no attribute 'device_mesh'" (huggingface/accelerate#3898). The heads are small and are
    built identically on every rank (seeded init, draft vocabulary counted from the same rows), so each rank
    shards its own copy; the target (load_target) keeps the setting.
    """
    plugin = getattr(par.accelerator.state, "fsdp_plugin", None)
    if par.backend != "fsdp2" or plugin is None or not plugin.cpu_ram_efficient_loading:
        return par.accelerator.prepare(student, optimizer)
    plugin.cpu_ram_efficient_loading = False
    try:
        return par.accelerator.prepare(student, optimizer)
    finally:
        plugin.cpu_ram_efficient_loading = True


def load_target(par: Parallel, build, sharded_random_seed: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(callable target, its plain module). `build()` returns the frozen model on CPU (or partitioned/meta).

    `sharded_random_seed`: build() gives a random target whose parameters are still on the meta device (FSDP2) or
    partitioned by zero.Init (ZeRO-3); it is sharded, then its shards are drawn on the device from this seed.
    """
    acc = par.accelerator
    if sharded_random_seed is not None and not par.shard_target:
        raise ValueError(
            f"random_target_init: sharded needs a sharded target (FSDP2 or DeepSpeed ZeRO-3, more than one process); "
            f"this job is {par.backend} with {acc.num_processes} process(es)"
        )
    if par.backend == "deepspeed" and par.teacher_ds_config is not None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        dschf = HfDeepSpeedConfig(par.teacher_ds_config)  # while alive, from_pretrained loads straight into shards
        model = build()
        engine, *_ = deepspeed.initialize(model=model, config=par.teacher_ds_config)
        engine.eval()
        del dschf
        return engine, engine.module
    model = build()
    if par.backend == "fsdp2" and par.shard_target:
        from accelerate.utils import fsdp2_prepare_model

        plugin = acc.state.fsdp_plugin
        efficient = plugin.cpu_ram_efficient_loading
        if sharded_random_seed is not None:
            plugin.cpu_ram_efficient_loading = False  # there is no rank-0 copy to broadcast: shards stay on meta
        try:
            with _own_wrap_policy(plugin):
                model = fsdp2_prepare_model(acc, model)
        finally:
            plugin.cpu_ram_efficient_loading = efficient
        if sharded_random_seed is not None:
            from speculators.train.models import init_sharded_random

            init_sharded_random(model, acc.device, sharded_random_seed, acc.process_index)
        return model, model
    return model.to(acc.device), model


def gather_rows(weight: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Rows `ids` (all if None) of a possibly sharded frozen weight, as a plain local tensor on every rank.

    Collective under FSDP2 (DTensor) and ZeRO-3: every rank must call it.
    """
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
        full = weight.full_tensor()
    elif hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            full = weight.data.clone() if ids is None else weight.data[ids.to(weight.device)].clone()
        return full
    else:
        full = weight.detach()
    return full if ids is None else full[ids.to(full.device)]
