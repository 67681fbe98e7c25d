"""`Trainer`: distils MLP speculator heads from a frozen target. Its attributes are the table of contents.

Each optimizer step: the target reads a packed batch once (hidden states, and the soft labels' source), the
heads run teacher-forced on those states, and the fused output layer + loss gives the gradients (train/loss.py).
From `stage2_start_step` on the batches are the target's own continuations (train/generate.py).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from speculators import MLPSpeculator
from speculators.draft_vocab import count_tokens, coverage, select_draft_vocab
from speculators.train import metrics
from speculators.train.acceptance import Simulation, right_pad, simulate_generated, trees_for, valid_positions
from speculators.train.checkpoint import CheckpointManager, _test_hook
from speculators.train.config import ConfigError, TrainConfig
from speculators.train.generate import Stage2Pool, greedy_continuations
from speculators.train.models import build_heads, build_target, build_tokenizer, eos_ids
from speculators.train.parallel import Parallel, build_parallel, load_target, prepare_heads
from speculators.train.student import Student
from speculators.train.teacher import Teacher


class Trainer:
    cfg: TrainConfig
    par: Parallel  # accelerator + how the target is laid out
    tokenizer: object
    teacher: Teacher  # the frozen target (replicated or sharded)
    heads: MLPSpeculator  # the plain heads module (what is saved)
    student: nn.Module  # heads + loss, as accelerate wrapped them
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped here once per optimizer step (not by accelerate)
    train_batches: object  # train/data.py ShardedBatches: deterministic, resumable
    stage2: Stage2Pool | None
    eval_rows: torch.Tensor  # [N, L] this rank's held-out rows
    eval_prompts: list[list[int]]  # this rank's held-out prompts
    checkpoints: CheckpointManager
    logger: metrics.MetricLogger
    step: int  # optimizer steps done
    tokens: int  # training tokens (positions the heads learned on), all ranks

    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import set_seed

        from speculators.train.data import ShardedBatches, build_datasets

        self.cfg = cfg
        self.par = build_parallel(cfg)
        acc = self.accelerator = self.par.accelerator
        set_seed(cfg.seed)
        self.print = acc.print
        self.out = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(acc, self.out, cfg.keep_checkpoints)
        resume_from = self._resume_path()

        self.print(f"[setup] {acc.num_processes} process(es), backend {self.par.backend}, device {acc.device}, "
                   f"target {'sharded' if self.par.shard_target else 'replicated'}, mixed precision {acc.mixed_precision}")
        self.tokenizer = build_tokenizer(cfg)
        t0 = time.perf_counter()
        sharded_seed = cfg.seed if cfg.random_target_init == "sharded" else None
        model, module = load_target(self.par, lambda: build_target(cfg, acc.device), sharded_seed)
        self.print(f"[setup] target {cfg.target} loaded in {time.perf_counter() - t0:.1f}s")
        self.eos = eos_ids(self.tokenizer, module)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos[0] if self.eos else 0)

        n = cfg.n_predict
        with acc.main_process_first():
            train_ds, eval_ds, eval_prompts = build_datasets(cfg.data_config(), self.tokenizer, extra_tokens=n + 1)
        self.print(f"[data] {cfg.data}: {len(train_ds)} train rows, {len(eval_ds)} eval rows of {cfg.seq_len} + {n + 1} tokens, "
                   f"{len(eval_prompts)} eval prompts")
        if len(train_ds) == 0:
            raise ValueError(f"no training rows from {cfg.data}: the data is shorter than one row of seq_len + n_predict + 1 tokens")

        # Heads, draft vocabulary, loss module, optimizer.
        self.heads = build_heads(cfg, module)
        draft_ids = self._draft_vocab(train_ds, eval_ds)
        student = Student(self.heads, cfg.loss, cfg.soft_weight, cfg.loss_chunk_tokens)
        if cfg.compile:
            student.states_fn = torch.compile(self.heads.speculator.states, dynamic=False)
        decay = [p for name, p in student.named_parameters() if p.dim() >= 2]
        other = [p for name, p in student.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas),
            # One fused kernel per step on GPUs: the foreach path made ~10 passes over the heads' fp32 weights and
            # moments, ~20 ms of a 1.5B-target step on an H100 (docs/BENCHMARKS.md).
            fused=acc.device.type == "cuda" or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda)
        self.student, self.optimizer = prepare_heads(self.par, student, optimizer)  # parallel.py says why

        # The target's forward path (decided on one held-out batch, the same on every rank).
        self.teacher = Teacher(model, module, draft_ids, need_soft=cfg.loss != "hard", soft_teacher=cfg.soft_teacher)
        sample = (eval_ds[0] if len(eval_ds) else train_ds[0]).unsqueeze(0)[:, : min(64, cfg.seq_len + n)].to(acc.device)
        note = self.teacher.setup(sample, self._all_ranks)
        self.print(f"[setup] target path: {note}")

        rank, world = acc.process_index, acc.num_processes
        self.train_batches = ShardedBatches(train_ds, cfg.batch_size, rank, world, cfg.seed)
        self.stage2 = None
        if cfg.stage2_start_step is not None:
            chat_prompts = train_ds.prompts[rank::world] if train_ds.prompts else None
            if chat_prompts is not None:
                self.print(f"[stage 2] {len(train_ds.prompts)} chat prompts (first user turns of the training records)")
            self.stage2 = Stage2Pool(cfg, self.teacher, self.train_batches, acc.device, self.pad_id, self.eos, rank,
                                     synced_gpus=self.par.shard_target, prompts=chat_prompts, all_ranks=self._all_ranks)
        per_rank = len(eval_ds) // world
        self.eval_rows = torch.stack([eval_ds[i] for i in range(rank, per_rank * world, world)]) if per_rank else torch.empty(0, cfg.seq_len + n + 1, dtype=torch.long)
        k = min(cfg.eval_gen_prompts, len(eval_prompts)) // world
        self.eval_prompts = [list(p)[-cfg.eval_prompt_max_len :] for p in eval_prompts[rank : k * world : world]]

        self.step, self.tokens = 0, 0
        self.logger = metrics.MetricLogger(cfg, enabled=acc.is_main_process, print_fn=self.print)
        if resume_from is not None:
            self._load(resume_from)
        elif acc.is_main_process:
            self.logger.truncate_after(0)
        if acc.is_main_process:
            import yaml

            (self.out / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---- setup helpers ---------------------------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume == "auto":
            latest = self.checkpoints.latest()
            self.print(f"[resume] {'from ' + str(latest) if latest else 'no checkpoint in ' + str(self.out) + ': starting fresh'}")
            return latest
        if cfg.resume == "none":
            if self.checkpoints.latest() is not None:
                raise ConfigError(f"resume: none but {self.out} already has checkpoints; use --resume auto or another --output_dir")
            return None
        return Path(cfg.resume)

    def _all_ranks(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() == self.accelerator.num_processes)

    def _lr_lambda(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _draft_vocab(self, train_ds, eval_ds) -> torch.Tensor | None:
        """Pick the draft vocabulary from token counts of the training rows (EOS always in); log its coverage."""
        cfg = self.cfg
        spec = self.heads.speculator
        if not spec.draft_vocab_size:
            return None
        if cfg.init_heads:
            ids = spec.draft_to_target.clone()
        else:
            rows = (train_ds[i] for i in range(min(len(train_ds), cfg.draft_vocab_rows)))
            counts = count_tokens(rows, spec.vocab_size)
            ids = select_draft_vocab(counts, spec.draft_vocab_size, always_include=self.eos)
            self.heads.set_draft_vocab(ids)
            self.draft_coverage = {"draft_vocab/coverage_train": coverage(counts, ids)}
            if len(eval_ds):
                eval_counts = count_tokens((eval_ds[i] for i in range(len(eval_ds))), spec.vocab_size)
                self.draft_coverage["draft_vocab/coverage_eval"] = coverage(eval_counts, ids)
            self.print(f"[draft vocab] {spec.draft_vocab_size} of {spec.vocab_size} tokens; coverage "
                       + ", ".join(f"{k.split('_')[-1]} {v:.4f}" for k, v in self.draft_coverage.items()))
        return ids.to(self.accelerator.device)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def _save(self) -> None:
        shared = {"tokens": self.tokens, "scheduler": self.scheduler.state_dict()}
        rank_state = {"data": self.train_batches.state_dict(), "stage2": self.stage2.state_dict() if self.stage2 else None}
        path = self.checkpoints.save(self.step, shared, rank_state, export=lambda tmp: self.export_heads(tmp / "heads"))
        self.print(f"[checkpoint] step {self.step} -> {path}")

    def _load(self, path: Path) -> None:
        shared, rank_state = self.checkpoints.load(path)
        self.step, self.tokens = shared["step"], shared["tokens"]
        self.scheduler.load_state_dict(shared["scheduler"])
        # The next step's learning rate, whatever the layout: a checkpoint written under another backend brings its
        # optimizer state by parameter, not its param groups (LambdaLR.load_state_dict leaves them as they are).
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.train_batches.load_state_dict(rank_state["data"])
        if self.stage2 is not None and rank_state.get("stage2"):
            self.stage2.load_state_dict(rank_state["stage2"])
        self.logger.truncate_after(self.step)
        self.print(f"[resume] step {self.step}, {self.tokens} tokens seen")

    # ---- training --------------------------------------------------------------------------------------------

    def _batch(self) -> torch.Tensor:
        in_stage2 = self.stage2 is not None and self.step >= self.cfg.stage2_start_step
        return next(self.stage2 if in_stage2 else self.train_batches)

    def _forward(self, ids: torch.Tensor):
        """Target once, then heads + loss (the wrapped student). ids: [B, T + n + 1]."""
        out = self.teacher(ids[:, :-1])
        with self.accelerator.autocast():
            return self.student(out.hidden, ids, soft_logits=out.logits, soft_weight=self.teacher.draft_weight,
                                soft_scale=self.teacher.logit_scale)

    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-batches); returns device tensors, read at the next log flush."""
        acc, cfg = self.accelerator, self.cfg
        n = cfg.n_predict
        loss_sum = torch.zeros(n, device=acc.device)
        correct = torch.zeros(n, device=acc.device)
        count = torch.zeros(n, device=acc.device)
        tokens = 0
        for _ in range(cfg.grad_accum):
            ids = self._batch().to(acc.device, non_blocking=True)
            with acc.accumulate(self.student):
                out = self._forward(ids)
                acc.backward(out.loss)  # accelerate divides by grad_accum itself
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += out.head_loss.float() / cfg.grad_accum
            correct += out.head_correct.float()
            count += out.head_count.float()
            tokens += ids.size(0) * (ids.size(1) - n - 1)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self.tokens += tokens * acc.num_processes
        return {"head_loss": loss_sum, "correct": correct, "count": count, "lr": lr}

    def _flush(self, pending: list[dict], t_start: float, tokens_start: int) -> dict | None:
        """Reduce the buffered steps across ranks (one sync), write them to the log; returns the last record."""
        if not pending:
            return None
        acc = self.accelerator
        stacked = torch.stack([torch.cat([p["head_loss"], p["correct"], p["count"]]) for p in pending])
        stacked = acc.reduce(stacked, reduction="sum").cpu().double()
        n = self.cfg.n_predict
        elapsed = max(time.perf_counter() - t_start, 1e-9)
        tps = (self.tokens - tokens_start) / elapsed
        records = []
        for p, row in zip(pending, stacked):
            head_loss = (row[:n] / acc.num_processes).tolist()
            head_acc = (row[n : 2 * n] / row[2 * n :].clamp(min=1)).tolist()
            records.append({
                "step": p["step"], "loss": sum(head_loss), "head_loss": head_loss, "head_acc": head_acc,
                "lr": p["lr"], "tokens": p["tokens"], "tokens_per_s": tps, "stage": p["stage"],
            })
        if acc.device.type == "cuda":  # this rank's peak so far: what sharding the target saves
            records[-1]["peak_mem_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self.logger.steps(records)
        return records[-1]

    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if cfg.progress_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.student.train()
        pending: list[dict] = []
        t_start, tokens_start = time.perf_counter(), self.tokens
        while self.step < cfg.max_steps:
            stage = 2 if self.stage2 is not None and self.step >= cfg.stage2_start_step else 1
            rec = self.train_step()
            rec.update(step=self.step, tokens=self.tokens, stage=stage)
            pending.append(rec)
            if bar is not None:
                bar.update(1)
            last = self.step == cfg.max_steps
            save = last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
            if self.step % cfg.log_every == 0 or save or last:
                line = self._flush(pending, t_start, tokens_start)
                pending = []
                t_start, tokens_start = time.perf_counter(), self.tokens
                if line is not None and acc.is_main_process:
                    msg = metrics.format_line(self.step, cfg.max_steps, line)
                    bar.write(msg) if bar is not None else print(msg, flush=True)
            if save:
                self._save()
                t_start = time.perf_counter()  # tokens/s is training time only
            _test_hook("SPECULATORS_TEST_EXIT_AFTER_STEP", self.step)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                self.evaluate()
                t_start, tokens_start = time.perf_counter(), self.tokens
        if bar is not None:
            bar.close()
        return self.evaluate()

    # ---- eval ------------------------------------------------------------------------------------------------

    def eval_heads(self) -> MLPSpeculator:
        """The heads with full weights on every rank (FSDP2 shards them; everything else keeps them whole)."""
        if self.par.backend != "fsdp2":
            return self.heads
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in self.heads.state_dict().items()}
        full = MLPSpeculator(self.heads.config).to(self.accelerator.device)
        full.load_state_dict(state)
        return full.eval()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out accuracy and loss per head, tau on held-out data and on the target's greedy continuations."""
        cfg, acc = self.cfg, self.accelerator
        n = cfg.n_predict
        t0 = time.perf_counter()
        self.student.eval()
        heads = self.eval_heads()
        trees = trees_for(self.heads)
        values: dict[str, float] = {}

        # Held-out data: teacher-forced loss / top-1 accuracy per head, and the acceptance simulation (a proxy).
        sums = torch.zeros(3 * n, device=acc.device, dtype=torch.float64)
        data_sim = Simulation(trees, n)
        rows = self.eval_rows[: cfg.eval_batches * cfg.batch_size]
        for s in range(0, rows.size(0), cfg.batch_size):
            ids = rows[s : s + cfg.batch_size].to(acc.device)
            teach = self.teacher(ids[:, :-1])
            with acc.autocast():
                out = self.student(teach.hidden, ids, soft_logits=teach.logits, soft_weight=self.teacher.draft_weight,
                                   soft_scale=self.teacher.logit_scale)
            sums += torch.cat([out.head_loss.double() * ids.size(0), out.head_correct.double(), out.head_count.double()])
            T = ids.size(1) - n - 1
            valid = torch.zeros(ids.size(0), T + n, dtype=torch.bool, device=acc.device)
            valid[:, :T] = True
            data_sim.add(heads, teach.hidden.to(next(heads.parameters()).dtype), ids, valid)
        sums = acc.reduce(sums, reduction="sum").cpu()
        n_rows = acc.reduce(torch.tensor([float(rows.size(0))], device=acc.device), reduction="sum").item()
        if n_rows:
            for i in range(n):
                values[f"data/loss_head{i}"] = sums[i].item() / n_rows
                values[f"data/acc_head{i}"] = sums[2 * n + i].item() and sums[n + i].item() / sums[2 * n + i].item()
            data_sim.load_vector(acc.reduce(data_sim.vector().to(acc.device), reduction="sum"))
            values.update(data_sim.summary("data"))

        # The target's own greedy continuations of held-out prompts: exact for greedy decoding.
        if self.eval_prompts and cfg.eval_gen_new_tokens > 0:
            gen_sim = Simulation(trees, n)
            conts = greedy_continuations(
                self.teacher.module, self.eval_prompts, cfg.eval_gen_new_tokens, batch_size=cfg.batch_size,
                pad_id=self.pad_id, eos_ids=self.eos, synced_gpus=self.par.shard_target, generate=self.teacher.generate,
            )
            dtype = next(heads.parameters()).dtype
            simulate_generated(heads, lambda ids: self.teacher(ids).hidden.to(dtype), self.eval_prompts, conts,
                               self.pad_id, gen_sim, batch_size=cfg.batch_size)
            gen_sim.load_vector(acc.reduce(gen_sim.vector().to(acc.device), reduction="sum"))
            values.update(gen_sim.summary("generated"))
            values["generated/tokens"] = acc.reduce(torch.tensor([float(sum(map(len, conts)))], device=acc.device), reduction="sum").item()
        values.update(getattr(self, "draft_coverage", {}))
        values["eval/seconds"] = time.perf_counter() - t0
        self.student.train()
        self.logger.metrics(self.step, {f"eval/{k}" if not k.startswith(("eval/", "draft_vocab/")) else k: v for k, v in values.items()})
        self.print(f"[eval] step {self.step} | {metrics.format_eval(values)}")
        self.last_eval = values
        return values

    # ---- output ----------------------------------------------------------------------------------------------

    def export_heads(self, directory: Path) -> None:
        """`save_pretrained` of the heads into `directory`, in bf16 (as served). Every rank calls it: under FSDP2 and
        ZeRO-3 gathering the full state dict is collective; only the main process writes."""
        state = self.accelerator.get_state_dict(self.student)  # full state dict on the main process under every backend
        if self.accelerator.is_main_process:
            heads_state = {k[len("heads."):]: (v.to(torch.bfloat16) if v.is_floating_point() else v)
                           for k, v in state.items() if k.startswith("heads.")}
            # A bf16 module around these tensors (built on meta: no copy, no init), so config.json says bfloat16 too.
            with torch.device("meta"):
                served = MLPSpeculator(copy.deepcopy(self.heads.config))  # save_pretrained writes config.dtype
            served.load_state_dict(heads_state, assign=True)
            served.save_pretrained(directory)

    def save_final(self, eval_values: dict) -> Path:
        """Heads via save_pretrained into output_dir (written to a temp dir, then moved file by file), eval.json, plot."""
        acc = self.accelerator
        tmp = self.out / ".heads.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.export_heads(tmp)
        if acc.is_main_process:
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # weights first, config last
                os.replace(f, self.out / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
            result = {"step": self.step, "tokens": self.tokens, "config": self.cfg.to_dict(), "metrics": eval_values}
            metrics.write_json(self.out / "eval.json", result)
            plot = metrics.plot_acceptance(eval_values, self.cfg.n_predict, self.out / "acceptance.png")
            self.print(f"[done] heads in {self.out} (eval.json{', acceptance.png' if plot else ''})")
        acc.wait_for_everyone()
        return self.out

    def push(self, eval_values: dict) -> str | None:
        """Upload the final heads + model card; a HubError (no network, no auth) leaves output_dir as it is."""
        if not self.cfg.push_to_hub or not self.accelerator.is_main_process:
            return None
        from speculators.hub import ModelCardInfo, push_heads_to_hub, write_model_card

        card = ModelCardInfo(
            target_model=self.cfg.target, datasets=[self.cfg.data],
            metrics={k: v for k, v in eval_values.items() if k.endswith(("/tau", "/tau_walk")) or "acc_head" in k},
            notes=f"Trained with mlp-speculators for {self.step} steps ({self.tokens} tokens), loss: {self.cfg.loss}.",
        )
        write_model_card(self.out, self.heads.config, card, self.cfg.push_to_hub)
        stage = self.out / ".hub-upload"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        for name in ("config.json", "model.safetensors", "eval.json", "acceptance.png", "recipe.yaml"):
            if (self.out / name).exists():
                try:
                    os.link(self.out / name, stage / name)
                except OSError:
                    shutil.copy2(self.out / name, stage / name)
        try:
            url = push_heads_to_hub(self.heads, self.cfg.push_to_hub, card=card, local_dir=stage, private=self.cfg.hub_private)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.print(f"[hub] pushed to {url}")
        return url
