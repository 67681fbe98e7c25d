"""The target's own text: greedy continuations for the eval, and the stage-2 pool of sampled rows.

Stage 2 (IBM's recipe): after `stage2_start_step` the heads train on what the target itself writes, so they
learn its distribution rather than the data's. The target samples with the recipe's settings (batched, KV-cached
HF generate); the rows are served batch by batch until the pool runs out, then refreshed. Prompts, by
`stage2_prompts`:

* windows (IBM's): stage2_prompt_len tokens cut from training rows, each continued for exactly stage2_new_tokens
  (EOS may not end a row early), so every row has the same length and no padding;
* chat: the first user turn of each training conversation, which the target answers until its EOS; the
  prompt + answer documents are packed into rows of the stage-1 length, as stage 1 packs conversations. The
  heads then learn the target's answers, which are what they draft when the target serves a chat.

The pool and its position (and the chat prompts' position) are part of the checkpoint, so a resumed run trains
on exactly the rows the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _generation_config(max_new_tokens: int, pad_id: int, eos_ids, *, sample: bool, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0):
    """Every sampling field set explicitly: a model's generation_config.json (repetition_penalty, top_k, ...) must
    not leak into greedy evals or stage-2 sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=sample,
        temperature=temperature if sample else 1.0, top_k=(top_k or None) if sample else None,
        top_p=top_p if sample else 1.0, repetition_penalty=1.0, num_beams=1,
        pad_token_id=pad_id, eos_token_id=list(eos_ids) if eos_ids else None, use_cache=True,
    )


def cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """tokens up to and including the first EOS (all of them when there is none)."""
    return tokens[: next((j + 1 for j, tok in enumerate(tokens) if tok in eos), len(tokens))]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, L - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 8,
                         pad_id: int = 0, eos_ids: Sequence[int] | None = None, synced_gpus: bool = False,
                         generate=None) -> list[list[int]]:
    """The target's greedy continuation of every prompt, cut after its first EOS (kept).

    model: a plain causal LM (its device is used); `generate` overrides model.generate (a sharded target's).
    """
    generate = generate or model.generate
    device = next(model.parameters()).device
    eos = set(eos_ids or [])
    gc = _generation_config(max_new_tokens, pad_id, eos_ids, sample=False)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s : s + batch_size], pad_id)
        gen = generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc, synced_gpus=synced_gpus)
        out.extend(cut_after_eos(row, eos) for row in gen[:, ids.size(1) :].tolist())
    return out


class Stage2Pool:
    """Target-generated training rows, refreshed when used up: [stage2_prompt_len + stage2_new_tokens] (windows)
    or [seq_len + n_predict + 1] (chat)."""

    def __init__(self, cfg, teacher, data, device: torch.device, pad_id: int, eos_ids, rank: int, synced_gpus: bool,
                 prompts: Sequence[Sequence[int]] | None = None, all_ranks=None):
        """data: the stage-1 batch iterator (windows cut prompts from its rows); prompts: this rank's chat prompts
        (stage2_prompts: chat); all_ranks(flag) -> whether every rank's flag is set (one collective), so that all
        ranks call generate equally often, as a sharded target needs."""
        self.cfg = cfg
        self.teacher = teacher
        self.data = data
        self.device = device
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.rank = rank
        self.synced_gpus = synced_gpus
        self.chat = cfg.stage2_prompts == "chat"
        if self.chat and not prompts:
            raise ValueError(f"stage2_prompts: chat needs chat records (a user turn) in the training data; {cfg.data} gave "
                             "this rank none (use stage2_prompts: windows for plain text)")
        self.prompts = [list(p)[-cfg.stage2_prompt_len :] for p in prompts or []]
        self.all_ranks = all_ranks or (lambda flag: flag)
        self.rows: torch.Tensor | None = None  # [R, row_len] on CPU
        self.cursor = 0
        self.refreshes = 0
        self.epoch = 0  # passes over the current pool so far
        self.prompt_cursor = 0  # chat: prompts used in the current pass over them
        self.prompt_epoch = 0

    @property
    def row_len(self) -> int:
        cfg = self.cfg
        return cfg.seq_len + cfg.n_predict + 1 if self.chat else cfg.stage2_prompt_len + cfg.stage2_new_tokens

    def _rows_per_step(self, row_len: int) -> int:
        """Rows of `row_len` tokens that hold as many tokens as a stage-1 batch."""
        cfg = self.cfg
        return max(1, cfg.batch_size * (cfg.seq_len + cfg.n_predict + 1) // row_len)

    @property
    def batch_size(self) -> int:
        return self.cfg.stage2_batch_size or self._rows_per_step(self.row_len)

    def _window_prompts(self, count: int) -> torch.Tensor:
        P, out, have = self.cfg.stage2_prompt_len, [], 0
        while have < count:
            rows = next(self.data)  # [B, L]
            k = rows.size(1) // P
            if k == 0:
                raise ValueError(f"stage2_prompt_len = {P} is longer than a training row ({rows.size(1)} tokens)")
            cut = rows[:, : k * P].reshape(-1, P)
            out.append(cut)
            have += cut.size(0)
        return torch.cat(out)[:count]

    def _chat_prompts(self, count: int) -> list[list[int]]:
        """The next `count` prompts of this rank's share, in a seeded order that changes with each pass."""
        out = []
        while len(out) < count:
            if self.prompt_cursor >= len(self.prompts):
                self.prompt_cursor, self.prompt_epoch = 0, self.prompt_epoch + 1
            g = torch.Generator().manual_seed(self.cfg.seed * 6151 + self.prompt_epoch * 193 + self.rank)
            order = torch.randperm(len(self.prompts), generator=g)
            take = order[self.prompt_cursor : self.prompt_cursor + count - len(out)].tolist()
            out.extend(self.prompts[i] for i in take)
            self.prompt_cursor += len(take)
        return out

    def _generation_config(self):
        cfg = self.cfg
        sample = cfg.stage2_temperature > 0
        # windows rows must all reach stage2_new_tokens; chat answers end at the target's EOS.
        return _generation_config(cfg.stage2_new_tokens, self.pad_id, self.eos_ids, sample=sample,
                                  temperature=cfg.stage2_temperature, top_k=cfg.stage2_top_k, top_p=cfg.stage2_top_p,
                                  min_new_tokens=0 if self.chat else cfg.stage2_new_tokens)

    def _gen_batch_size(self) -> int:
        """Prompts per generate call: the recipe's, else 4 stage-2 batches (chat: of prompt + answer-sized rows)."""
        cfg = self.cfg
        per_step = self._rows_per_step(cfg.stage2_prompt_len + cfg.stage2_new_tokens) if self.chat else self.batch_size
        return cfg.stage2_gen_batch_size or 4 * per_step

    def _generate_windows(self, count: int) -> torch.Tensor:
        prompts, gc, gen_bs, rows = self._window_prompts(count), self._generation_config(), self._gen_batch_size(), []
        for s in range(0, count, gen_bs):
            batch = prompts[s : s + gen_bs].to(self.device)
            gen = self.teacher.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=gc,
                                        synced_gpus=self.synced_gpus)
            rows.append(gen[:, : self.row_len].cpu())
        return torch.cat(rows)

    def _generate_chat(self, count: int) -> torch.Tensor:
        """Answers to batches of prompts until every rank has `count` packed rows (every rank generates as often)."""
        gc, gen_bs, eos = self._generation_config(), self._gen_batch_size(), set(self.eos_ids or [])
        stream: list[int] = []
        while not self.all_ranks(len(stream) >= count * self.row_len):
            prompts = self._chat_prompts(gen_bs)
            ids, mask = left_pad(prompts, self.pad_id)
            gen = self.teacher.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        generation_config=gc, synced_gpus=self.synced_gpus)
            for prompt, answer in zip(prompts, gen[:, ids.size(1) :].tolist()):
                stream.extend(prompt)
                stream.extend(cut_after_eos(answer, eos))
        return torch.tensor(stream[: count * self.row_len], dtype=torch.long).view(count, self.row_len)

    @torch.no_grad()
    def refresh(self) -> None:
        cfg = self.cfg
        count = cfg.stage2_pool_steps * cfg.grad_accum * self.batch_size
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Seeded per refresh and rank: sampling does not disturb the run's RNG, and reruns are reproducible.
            torch.manual_seed(cfg.seed * 1_000_003 + self.refreshes * 1009 + self.rank)
            self.rows = self._generate_chat(count) if self.chat else self._generate_windows(count)
        self.cursor = 0
        self.epoch = 0
        self.refreshes += 1

    def _next_epoch(self) -> None:
        """Another pass over the same rows, reshuffled (seeded, so a resumed run sees the same order)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.refreshes * 104_729 + self.epoch * 31 + self.rank)
        self.rows = self.rows[torch.randperm(self.rows.size(0), generator=g)]
        self.cursor = 0
        self.epoch += 1

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        B = self.batch_size
        if self.rows is None or self.cursor + B > self.rows.size(0):
            if self.rows is not None and self.epoch + 1 < self.cfg.stage2_pool_epochs and self.rows.size(0) >= B:
                self._next_epoch()
            else:
                self.refresh()
        batch = self.rows[self.cursor : self.cursor + B]
        self.cursor += B
        return batch

    def state_dict(self) -> dict:
        return {"rows": self.rows, "cursor": self.cursor, "refreshes": self.refreshes, "epoch": self.epoch,
                "prompt_cursor": self.prompt_cursor, "prompt_epoch": self.prompt_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.cursor, self.refreshes = state["rows"], state["cursor"], state["refreshes"]
        self.epoch = state.get("epoch", 0)
        self.prompt_cursor, self.prompt_epoch = state.get("prompt_cursor", 0), state.get("prompt_epoch", 0)
