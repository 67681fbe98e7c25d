"""scripts/bench.py end to end on CPU: tiny random float32 target, random heads, a draft model, a char tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_infer_common import char_tokenizer, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from tiny_models import tiny_target

from speculators import MLPSpeculator, MLPSpeculatorConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402

METHODS = bench.METHODS
PROMPTS = ["def fib(n):", "The quick brown fox", "SELECT * FROM"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(target with tokenizer, heads, draft model, prompt file)."""
    root = tmp_path_factory.mktemp("bench")
    tiny_target(seed=0).save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    tiny_target(seed=1).save_pretrained(root / "draft")
    torch.manual_seed(0)
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=128, emb_dim=32, n_predict=3)).save_pretrained(root / "heads")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def result(dirs):
    out = dirs / "results.json"
    code = bench.main([
        "--target", str(dirs / "target"), "--heads", str(dirs / "heads"), "--draft", str(dirs / "draft"),
        "--prompts", str(dirs / "prompts.txt"), "--num-prompts", "3", "--max-tokens", "12", "--batch-sizes", "1,2",
        "--methods", ",".join(METHODS), "--device", "cpu", "--out", str(out), "--plot", str(dirs / "bench.png"),
        "--no-progress", "--no-adaptive",  # always speculate, so acceptance is measured on every step
    ])
    assert code == 0
    return json.loads(out.read_text())


def test_meta(result):
    meta = result["meta"]
    for key in ("date", "device", "dtype", "versions", "batch_sizes", "methods", "agreement_reference"):
        assert key in meta, key
    assert meta["dtype"] == "float32" and meta["agreement_reference"] == "plain@1"
    assert {"torch", "transformers", "mlp-speculators"} <= set(meta["versions"])


def test_every_method_and_batch_size(result):
    res = result["results"]
    assert list(res) == list(METHODS)
    for method in METHODS:
        for b in ("1", "2"):
            row = res[method][b]
            if method == "hf_prompt_lookup" and b == "2":
                assert "batch size 1 only" in row["skipped"]
                continue
            assert row["tok_s"] > 0 and row["generated_tokens"] > 0
            assert row["sequences"] == (3 if b == "1" else 4)  # repeated up to full batches
            assert row["tau"] >= 1.0
            baselines = {x for x in bench.BASELINES if x != method and not (x == "hf_prompt_lookup" and b == "2")}
            assert set(row["speedup"]) == baselines
            for base, value in row["speedup"].items():
                assert value == pytest.approx(row["tok_s"] / res[base][b]["tok_s"])


def test_greedy_outputs_agree(result):
    """float32: every method and batch size gives plain decoding's tokens (EOS handling included)."""
    for method, by_b in result["results"].items():
        for b, row in by_b.items():
            if "skipped" in row:
                continue
            agree = row["agreement"]
            assert agree["compared"] == 3
            assert agree["identical"] == 1.0, (method, b, agree)
            assert agree["mean_common_prefix"] == agree["mean_length"]


def test_acceptance_reported_for_speculation(result):
    res = result["results"]
    assert res["plain"]["1"]["tau"] == 1.0 and res["hf"]["1"]["tau"] == 1.0
    for method, depth in (("mlp_speculator", 3), ("draft_model", 4)):
        acc = res[method]["1"]["acceptance_rates"]
        assert acc is not None and len(acc) == depth and all(0.0 <= a <= 1.0 for a in acc)


def test_plot_written(result, dirs):
    assert (dirs / "bench.png").stat().st_size > 1000


def test_bad_arguments(dirs):
    with pytest.raises(SystemExit):
        bench.main(["--target", str(dirs / "target"), "--methods", "plain,nope"])
    with pytest.raises(SystemExit):
        bench.main(["--target", str(dirs / "target"), "--methods", "mlp_speculator"])  # no --heads


def test_tree_override(dirs):
    """--tree runs the heads with another candidate tree (here with 2 of the 3 heads)."""
    out = dirs / "tree.json"
    assert bench.main([
        "--target", str(dirs / "target"), "--heads", str(dirs / "heads"), "--prompts", str(dirs / "prompts.txt"),
        "--num-prompts", "2", "--max-tokens", "8", "--batch-sizes", "1", "--methods", "plain,mlp_speculator",
        "--tree", "3,2x4", "--device", "cpu", "--out", str(out), "--no-progress", "--no-adaptive",
    ]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["tree"] == "3,2x4"
    assert set(res["results"]["mlp_speculator"]["1"]["shapes"]) == {"tree[3, 2]x4"}
    assert res["results"]["mlp_speculator"]["1"]["agreement"]["identical"] == 1.0  # float32: greedy-exact
