"""`LLM`: vLLM's offline API (generate / chat / stream) over an `LLMEngine`.

    from speculators.infer import LLM, SamplingParams
    llm = LLM(model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
              speculative_config={"model": "heads-dir", "method": "mlp_speculator", "num_speculative_tokens": 4})
    out = llm.generate(["def fib(n):"], SamplingParams(temperature=0.0, max_tokens=256))[0]
    out.outputs[0].text, out.metrics.mean_tokens_per_step
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from speculators.infer.drafter import DraftModelDrafter, MLPDrafter, tree_for_heads
from speculators.infer.engine import LLMEngine
from speculators.infer.hf_model import load_hf_model
from speculators.infer.model import Unsupported, load_model, resolve_model_dir
from speculators.infer.outputs import RequestOutput
from speculators.infer.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

METHODS = ("mlp_speculator", "draft_model")
SPEC_KEYS = {
    "mlp_speculator": {"model", "method", "num_speculative_tokens", "top_k_tokens_per_head", "n_candidates", "adaptive"},
    "draft_model": {"model", "method", "num_speculative_tokens", "adaptive"},
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float32": torch.float32,
          "float": torch.float32, "float64": torch.float64}
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_MAX_NUM_SEQS = 16


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def load_causal_lm(name_or_path: str, dtype: torch.dtype, device: torch.device, max_model_len: int | None, model_impl: str):
    """(model, HF config, local dir): our Transformer where it applies, else transformers' modeling code."""
    if model_impl not in ("auto", "own", "hf"):
        raise ValueError(f"model_impl must be 'auto', 'own' or 'hf', got {model_impl!r}")
    from transformers import AutoConfig

    path = resolve_model_dir(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if model_impl != "hf":
        try:
            return load_model(path, config, dtype, device, max_model_len), config, path
        except Unsupported as err:
            if model_impl == "own":
                raise ValueError(f"our model cannot run {name_or_path}: {err}") from err
            logger.info("using transformers' modeling for %s (%s)", name_or_path, err)
    return load_hf_model(path, dtype, device, max_model_len), config, path


def eos_ids(path: Path, tokenizer) -> set[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):
        pass
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLM:
    """A target model, optionally with a speculator, behind vLLM's `LLM` interface.

    Args:
        model: target model: a local HF checkpoint directory or a Hub id.
        tokenizer: tokenizer directory / id, or a tokenizer object; None uses the model's (if it has one).
        speculative_config: None (plain decoding) or a dict with "model" (heads or draft model, dir or id),
            "method" ("mlp_speculator" or "draft_model"; inferred from the checkpoint when missing),
            "num_speculative_tokens" (heads used / draft tokens per step), and for mlp_speculator optionally
            "top_k_tokens_per_head" and "n_candidates" (the tree; default: the heads' config).
            "adaptive": False always runs the full tree instead of choosing per batch size (see `adaptive.py`).
        dtype: "bfloat16", "float16", "float32", "float64" or a torch dtype; default bfloat16 on CUDA, else float32.
        device: default "cuda" when available, else "cpu".
        max_model_len: context length (prompt + generated); default min(the model's, 4096).
        max_num_seqs: batch slots (requests decoded at once); default 16.
        seed: seeds the per-request seeds of requests without one.
        enforce_eager: no torch.compile, no CUDA graphs.
        model_impl: "auto" (our Llama/Qwen2/Mistral code when it applies, else transformers'), "own" or "hf".
    """

    def __init__(self, model: str, *, tokenizer=None, speculative_config: dict | None = None, dtype=None, device=None,
                 max_model_len: int | None = None, max_num_seqs: int | None = None, seed: int = 0,
                 enforce_eager: bool = False, model_impl: str = "auto"):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, device)
        spec = self._check_speculative_config(speculative_config)
        from transformers import AutoConfig

        path = resolve_model_dir(model)
        config = AutoConfig.from_pretrained(path)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_max = getattr(text_config, "max_position_embeddings", None)
        if max_model_len is None:
            max_model_len = min(model_max or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        elif model_max is not None and max_model_len > model_max:
            raise ValueError(f"max_model_len {max_model_len} is larger than the model's max_position_embeddings {model_max}")
        target, config, path = load_causal_lm(str(path), dtype, device, max_model_len, model_impl)
        self.tokenizer = self._load_tokenizer(tokenizer, path)
        drafter = self._build_drafter(spec, target, text_config, model, dtype, device, max_model_len, model_impl) if spec else None
        self.engine = LLMEngine(
            target, self.tokenizer, drafter=drafter, eos_token_ids=eos_ids(path, self.tokenizer),
            max_model_len=max_model_len, max_num_seqs=max_num_seqs or DEFAULT_MAX_NUM_SEQS, device=device,
            enforce_eager=enforce_eager, adaptive=spec.get("adaptive", True) if spec else True, seed=seed,
        )
        self.model_name, self.speculative_config, self.dtype, self.device = model, spec, dtype, device
        self._ids = itertools.count()

    # ---- construction ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_speculative_config(spec: dict | None) -> dict | None:
        if spec is None:
            return None
        if not isinstance(spec, dict) or "model" not in spec:
            raise ValueError(f"speculative_config must be a dict with at least a 'model' key, got {spec!r}")
        spec = dict(spec)
        method = spec.get("method")
        if method is None:
            from transformers import AutoConfig

            kind = getattr(AutoConfig.from_pretrained(str(resolve_model_dir(spec["model"]))), "model_type", None)
            method = spec["method"] = "mlp_speculator" if kind == "mlp_speculator" else "draft_model"
        if method not in METHODS:
            raise ValueError(f"unknown speculative method {method!r}: expected one of {', '.join(METHODS)} (or no speculative_config)")
        unknown = set(spec) - SPEC_KEYS[method]
        if unknown:
            raise ValueError(f"unknown speculative_config keys for {method}: {sorted(unknown)}; allowed: {sorted(SPEC_KEYS[method])}")
        k = spec.get("num_speculative_tokens")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"num_speculative_tokens must be at least 1, got {k!r}")
        if method == "draft_model" and k is None:
            raise ValueError("speculative_config for draft_model needs num_speculative_tokens (tokens drafted per step)")
        return spec

    @staticmethod
    def _load_tokenizer(tokenizer, path: Path):
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            return tokenizer
        from transformers import AutoTokenizer

        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if tokenizer is None and not any((path / f).exists() for f in files):
            logger.warning("no tokenizer in %s: prompts must be token ids and outputs have no text", path)
            return None
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer or path))
        except (OSError, ValueError, TypeError) as err:
            if tokenizer is not None:
                raise
            logger.warning("no tokenizer for %s (%s): prompts must be token ids and outputs have no text", path, err)
            return None

    @staticmethod
    def _build_drafter(spec, target, target_config, target_name, dtype, device, max_model_len, model_impl):
        if spec["method"] == "mlp_speculator":
            from speculators import MLPSpeculator, check_compatible

            heads = MLPSpeculator.from_pretrained(str(resolve_model_dir(spec["model"])))
            check_compatible(heads.config, SimpleNamespace(config=target_config))
            top_k, n = tree_for_heads(heads.config, spec.get("num_speculative_tokens"), spec.get("top_k_tokens_per_head"), spec.get("n_candidates"))
            heads = heads.to(device=device, dtype=dtype).eval().requires_grad_(False)
            return MLPDrafter(heads, top_k, n)
        draft, draft_config, _ = load_causal_lm(spec["model"], dtype, device, max_model_len, model_impl)
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft model {spec['model']} has a vocabulary of {draft.vocab_size} tokens but target {target_name} has "
                f"{target.vocab_size}: drafts must be target token ids"
            )
        draft_text = draft_config.get_text_config() if hasattr(draft_config, "get_text_config") else draft_config
        draft_max = getattr(draft_text, "max_position_embeddings", None)
        if draft_max is not None and draft_max < max_model_len:
            raise ValueError(f"draft model {spec['model']} supports {draft_max} positions, fewer than max_model_len {max_model_len}")
        return DraftModelDrafter(draft, spec["num_speculative_tokens"])

    # ---- requests ----------------------------------------------------------------------------------------------

    def get_tokenizer(self):
        return self.tokenizer

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]} instead")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._prompt(prompt["prompt"])
        raise ValueError(f"a prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}")

    def _add(self, prompts, sampling_params, kind: RequestOutputKind) -> list[str]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: pass one, or one per prompt")
        parsed = [self._prompt(p) for p in prompts]
        for _, ids in parsed:  # refuse before anything is queued
            self.engine.check_prompt(ids)
        ids_out = []
        for (text, ids), p in zip(parsed, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, ids, p.clone(output_kind=kind), prompt=text)
            ids_out.append(rid)
        return ids_out

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (a string, {"prompt_token_ids": [...]}, or a list of them); outputs in order."""
        from tqdm import tqdm

        ids = self._add(prompts, sampling_params, RequestOutputKind.FINAL_ONLY)
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        finally:  # interrupted (Ctrl-C, an error): leave nothing of this call in the engine
            for rid in ids:
                self.engine.abort_request(rid)
        return [done[i] for i in ids]

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield incremental outputs (new text and token ids only; the last one has finished=True) as they come."""
        ids = self._add(prompts, sampling_params, RequestOutputKind.DELTA)
        try:
            while self.engine.has_unfinished_requests():
                yield from self.engine.step()
        finally:  # the consumer stopped early or failed: abort what is left
            for rid in ids:
                self.engine.abort_request(rid)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def warmup(self, max_len: int | None = None, max_batch: int | None = None, sampling: bool = False) -> float:
        """Compile and capture every decode step up to `max_len` tokens per sequence and `max_batch` requests at
        once (default: the engine's limits), so that no later request pays for it; seconds taken.
        With sampling=True the sampling modes are captured too, not only greedy."""
        modes = ("greedy", "sample", "filter") if sampling else ("greedy",)
        return self.engine.warmup(max_len, max_batch, modes)

    def stats(self) -> dict:
        """Engine-level counters: steps, tokens, tree shapes used, measured latencies and acceptance estimates."""
        return self.engine.engine_stats()
