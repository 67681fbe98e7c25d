"""Hub I/O for speculator heads: a model card, and `push_heads_to_hub` with errors that say what happened.

Loading needs nothing here: `MLPSpeculator.from_pretrained(dir_or_hub_id)` is transformers' own.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from speculators.config import MLPSpeculatorConfig


class HubError(RuntimeError):
    """The Hub could not be reached or refused the upload; local files are untouched."""


@dataclass
class ModelCardInfo:
    """What a reader of the heads' model card wants to know; every field is optional."""

    target_model: str | None = None  # hub id or path of the target the heads were trained against
    datasets: list[str] = field(default_factory=list)  # training data (hub ids or descriptions)
    metrics: dict[str, float] = field(default_factory=dict)  # measured results, e.g. {"tau_humaneval": 3.6}
    notes: str = ""  # free text appended to the card (training command, hardware, ...)


def model_card(config: MLPSpeculatorConfig, info: ModelCardInfo, repo_id: str | None = None) -> str:
    """Markdown model card with YAML front matter, as the Hub renders it."""
    front = ["---", "library_name: mlp-speculators", "tags:", "- speculative-decoding", "- mlp-speculator"]
    if info.target_model:
        front.append(f"base_model: {info.target_model}")
    if info.datasets:
        front += ["datasets:"] + [f"- {d}" for d in info.datasets]
    front.append("---")

    draft_vocab = (
        f"{config.draft_vocab_size} most frequent target tokens (of {config.vocab_size})"
        if config.draft_vocab_size
        else f"full target vocabulary ({config.vocab_size})"
    )
    rows = [
        ("target model", info.target_model or "not recorded"),
        ("training data", ", ".join(info.datasets) or "not recorded"),
        ("heads (n_predict)", config.n_predict),
        ("emb_dim / inner_dim", f"{config.emb_dim} / {config.effective_inner_dim}"),
        ("draft vocabulary", draft_vocab),
        ("candidate tree (top_k_tokens_per_head, n_candidates)", f"{config.top_k_tokens_per_head}, {config.n_candidates}"),
        ("tied weights / scaled input", f"{config.tie_weights} / {config.scale_input}"),
    ]
    rows += [(name, f"{value:.3f}" if isinstance(value, float) else value) for name, value in info.metrics.items()]
    if not info.metrics:
        rows.append(("measured acceptance", "not measured"))
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]

    name = repo_id or "HEADS"
    target = info.target_model or "TARGET"
    body = [
        f"# {name}",
        "",
        "MLP speculator heads (IBM accelerator architecture, arXiv 2404.19124) for speculative decoding: each head",
        "reads the target's final hidden state and the previously chosen token and proposes one more token.",
        "",
        *table,
        "",
        "Tau is the expected number of tokens accepted per target forward (1 means no speed-up).",
        "",
        "## Use",
        "",
        "```python",
        "from speculators.infer import LLM, SamplingParams",
        f'llm = LLM(model="{target}",',
        f'          speculative_config={{"model": "{name}", "method": "mlp_speculator", "num_speculative_tokens": {config.n_predict}}})',
        'print(llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=128))[0].outputs[0].text)',
        "```",
    ]
    if not config.draft_vocab_size:
        body += ["", "The checkpoint is in IBM's `mlp_speculator` format, which vLLM's MLPSpeculator also loads."]
    if info.notes:
        body += ["", info.notes]
    return "\n".join(front + [""] + body) + "\n"


def write_model_card(directory: str | os.PathLike, config: MLPSpeculatorConfig, info: ModelCardInfo, repo_id: str | None = None) -> Path:
    """Write README.md into `directory` atomically (temp file, then rename)."""
    path = Path(directory) / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(model_card(config, info, repo_id))
    os.replace(tmp, path)
    return path


def push_heads_to_hub(
    heads,
    repo_id: str,
    *,
    card: ModelCardInfo | None = None,
    local_dir: str | os.PathLike | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MLP speculator heads",
    endpoint: str | None = None,
) -> str:
    """Upload heads (an `MLPSpeculator`) with a model card to `repo_id`; returns the commit URL.

    With `local_dir` (a directory that already holds the saved heads, e.g. a training run's output) the card is
    written there and that directory is uploaded; otherwise the heads are saved to a temporary directory first.
    Any failure to reach or write the Hub raises `HubError` naming the repo and the cause; local files stay.
    """
    from huggingface_hub import HfApi

    card = card or ModelCardInfo()
    api = HfApi(endpoint=endpoint, token=token)

    def upload(directory: str | os.PathLike) -> str:
        write_model_card(directory, heads.config, card, repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message)
        except Exception as err:  # network down, offline mode, auth, permissions: all end the same way
            where = f"; the heads are saved in {directory}" if local_dir is not None else ""
            raise HubError(f"could not push to the Hugging Face Hub repo {repo_id!r}: {type(err).__name__}: {err}{where}") from err
        return str(getattr(info, "commit_url", info))

    if local_dir is not None:
        return upload(local_dir)
    with tempfile.TemporaryDirectory(prefix="speculator-push-") as tmp:
        heads.save_pretrained(tmp)
        return upload(tmp)
