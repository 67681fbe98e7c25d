"""The frozen target as training uses it: final-norm hidden states, and the soft labels' source, from one forward.

Two ways to get the hidden states:
- "lm_head" (always correct): a pre-hook on the output embedding captures its input, as `speculators.TargetAdapter`
  does; the target computes its full-vocabulary logits [B, S, V] too.
- "decoder" (cheaper): a forward hook on `get_decoder()` captures its last_hidden_state and the target is called
  with logits_to_keep=1, so its full-vocabulary lm_head runs on one position only. At 152k vocabulary the lm_head
  is ~15% of a 1.5B target's FLOPs and its bf16 logits (B * S * V * 2 bytes) are the largest activation.
Soft labels then come from the target's logits ("logits") or, per loss chunk, from hidden @ lm_head[draft]^T
("hidden": the draft rows of the frozen lm_head are gathered once at startup, also under FSDP2 / ZeRO-3).
`setup()` runs both paths on one batch and keeps the cheap one only where it reproduces the target's own
(to bf16 precision); final-logit soft-capping (Gemma 2) fails the check and falls back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from speculators.train.parallel import gather_rows


@dataclass
class TeacherOutput:
    hidden: torch.Tensor  # [B, S, E] final-norm hidden states
    logits: torch.Tensor | None  # [B, S, V'] teacher logits on the heads' vocabulary (mode "logits"), else None


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


class Teacher:
    """Wraps the (possibly sharded) frozen target. `teacher(ids)` -> TeacherOutput."""

    def __init__(self, model: nn.Module, module: nn.Module, draft_ids: torch.Tensor | None, need_soft: bool, soft_teacher: str):
        self.model = model  # what is called: the module itself, an FSDP2 module or a DeepSpeed engine
        self.module = module  # the plain transformers model inside
        self.draft_ids = draft_ids
        self.need_soft = need_soft
        self.soft_teacher = soft_teacher
        self.hidden_from = "lm_head"
        self.soft_from = "logits" if need_soft else None
        self.draft_weight: torch.Tensor | None = None  # [V', E] draft rows of lm_head (soft from "hidden")
        self.logit_scale = 1.0 / float(getattr(module.config, "logits_scaling", 1.0) or 1.0)  # Granite divides
        self._captured: torch.Tensor | None = None
        module.get_output_embeddings().register_forward_pre_hook(self._capture_pre)
        decoder = module.get_decoder() if hasattr(module, "get_decoder") else None
        self._decoder = decoder if isinstance(decoder, nn.Module) and decoder is not module else None
        if self._decoder is not None:
            self._decoder.register_forward_hook(self._capture_post)

    def _capture_pre(self, _module, args):
        if self.hidden_from == "lm_head":
            self._captured = args[0]

    def _capture_post(self, _module, _args, output):
        if self.hidden_from == "decoder":
            self._captured = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, full_logits: bool):
        self._captured = None
        kwargs = {} if full_logits else {"logits_to_keep": 1}
        out = self.model(input_ids=ids, use_cache=False, **kwargs)
        hidden, self._captured = self._captured, None
        if hidden is None:
            raise RuntimeError(f"{type(self.module).__name__}'s forward did not reach the hooked module ({self.hidden_from})")
        return hidden, out.logits

    @torch.no_grad()
    def setup(self, ids: torch.Tensor, reduce_all) -> str:
        """Pick the cheapest correct path on a sample batch `ids` (the same on every rank); returns a description.

        `reduce_all(flag: bool) -> bool` is True only if the flag holds on every rank (ranks must agree, since
        the paths differ in collectives under FSDP2 / ZeRO-3).
        """
        self.hidden_from = "lm_head"
        ref_hidden, ref_logits = self._run(ids, full_logits=True)
        ok_decoder = False
        if self._decoder is not None:
            self.hidden_from = "decoder"
            try:
                hidden, _ = self._run(ids, full_logits=False)
                ok_decoder = hidden.shape == ref_hidden.shape and _rel_err(hidden, ref_hidden) < 1e-3
            except Exception:  # a model whose forward does not take logits_to_keep
                ok_decoder = False
        ok_decoder = reduce_all(ok_decoder)
        self.hidden_from = "decoder" if ok_decoder else "lm_head"

        notes = [f"hidden states from {'the decoder (lm_head skipped)' if ok_decoder else 'the lm_head input'}"]
        if self.need_soft:
            weight = gather_rows(self.module.get_output_embeddings().weight, self.draft_ids)
            self.draft_weight = weight.to(ref_hidden.device)
            mine = (ref_hidden.to(weight.dtype) @ self.draft_weight.t()).float() * self.logit_scale
            theirs = ref_logits.float() if self.draft_ids is None else ref_logits.float()[..., self.draft_ids.to(ref_logits.device)]
            err = _rel_err(mine, theirs)
            ok_hidden = reduce_all(err < 2e-2 and ok_decoder)
            want_hidden = self.soft_teacher in ("auto", "hidden")
            if self.soft_teacher == "hidden" and not ok_hidden:
                raise ValueError(
                    f"soft_teacher: hidden does not reproduce this target's logits (relative error {err:.3g}"
                    f"{', decoder output differs from the lm_head input' if not ok_decoder else ''}); use soft_teacher: logits"
                )
            self.soft_from = "hidden" if (want_hidden and ok_hidden) else "logits"
            if self.soft_from == "logits":
                self.draft_weight = None
                if ok_decoder:  # the soft labels need the full logits after all
                    self.hidden_from = "lm_head"
                    notes[0] = "hidden states from the lm_head input"
            notes.append(f"soft labels from {'hidden @ lm_head[draft]^T per chunk' if self.soft_from == 'hidden' else 'the target logits'} (check rel. err {err:.2e})")
        return "; ".join(notes)

    def __call__(self, ids: torch.Tensor) -> TeacherOutput:
        """ids: [B, S] -> hidden [B, S, E] and, when soft labels come from logits, [B, S, V'] logits."""
        full = self.hidden_from == "lm_head"
        hidden, logits = self._run(ids, full_logits=full)
        if self.soft_from != "logits":
            return TeacherOutput(hidden, None)
        if self.draft_ids is not None:
            logits = logits[..., self.draft_ids.to(logits.device)]
        return TeacherOutput(hidden, logits)

    def generate(self, **kwargs):
        """HF generate on the plain module; under sharding every rank must call it (synced_gpus)."""
        return self.module.generate(**kwargs)
