"""DeepSpeed on the CPU, two processes over gloo, under the repo's own launch configs (deepspeed-zero2.yaml and
deepspeed-zero3.yaml with --num_processes 2): the job starts (accelerate used to reject the heads' DeepSpeed plugin
whenever the launch config had DeepSpeed keys), trains with DDP's per-step losses for the same seed, and resumes
after a kill (`--resume auto`).

Under zero-stage 3 the target is sharded by its own inference-only ZeRO-3 engine and the heads train under ZeRO-2;
under zero-stage 2 the target is replicated (train/parallel.py). accelerate turns DeepSpeed on for accelerator
devices only; train/parallel.py switches CPU processes to it, as it does for FSDP2. The losses are fp32 on the CPU
(mixed precision 'no'), so they match DDP's to float rounding; gradient accumulation 2, so that DeepSpeed's own
accumulation and clipping (the recipe's grad_accum and grad_clip, in its config) are what is compared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import strategy_runs
from strategy_runs import ENV, ROOT, TOL, assert_same_heads, assert_same_losses, losses

CONFIGS = {
    "ddp": ["--config_file", "recipes/accelerate/cpu-2proc.yaml"],
    "zero2": ["--config_file", "recipes/accelerate/deepspeed-zero2.yaml", "--num_processes", "2"],
    "zero3": ["--config_file", "recipes/accelerate/deepspeed-zero3.yaml", "--num_processes", "2"],
    "fsdp2": ["--config_file", "recipes/accelerate/cpu-2proc-fsdp2.yaml"],
}



def launch(strategy: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return strategy_runs.launch(CONFIGS[strategy], out, *extra, env=env)


def assert_deepspeed_checkpoint(checkpoint: Path) -> None:
    """DeepSpeed's engine layout, with the heads' optimizer state partitioned over the two ranks (ZeRO)."""
    engine = checkpoint / "pytorch_model"
    assert engine.is_dir() and not (checkpoint / "model.safetensors").exists(), sorted(p.name for p in checkpoint.iterdir())
    assert sorted(p.name for p in engine.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def uninterrupted(strategy: str, tmp_path_factory):
    return strategy_runs.timed_run(CONFIGS[strategy], tmp_path_factory.mktemp(f"ref-{strategy}"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return uninterrupted("ddp", tmp_path_factory)


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_plugin_starts_in_the_launch_configs_environment(strategy, tmp_path, monkeypatch):
    """The root cause, in process: `accelerate launch` lists the yaml's deepspeed_config keys in
    ACCELERATE_CONFIG_DS_FIELDS, and DeepSpeedPlugin(hf_ds_config=...) refuses to start next to them."""
    from accelerate.utils import DeepSpeedPlugin

    from speculators.train.parallel import _plugin

    dump = tmp_path / "env.py"
    dump.write_text("import json, os, sys\nif os.environ.get('RANK') == '0':\n"
                    "    json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *CONFIGS[strategy], str(dump), str(tmp_path / "env.json")]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    launched = json.loads((tmp_path / "env.json").read_text())
    for key, value in launched.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    assert "zero_stage" in os.environ["ACCELERATE_CONFIG_DS_FIELDS"].split(",")
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    with pytest.raises(ValueError, match="accelerate config variables will be ignored"):
        DeepSpeedPlugin(hf_ds_config=json.loads(json.dumps(config)))  # what build_parallel did
    plugin = _plugin(json.loads(json.dumps(config)))
    assert os.environ["ACCELERATE_CONFIG_DS_FIELDS"] == launched["ACCELERATE_CONFIG_DS_FIELDS"]  # left as it was
    # The recipe's values, not the launch yaml's (gradient_accumulation_steps 1, gradient_clipping 1.0, stage 3).
    assert (plugin.zero_stage, plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (2, 2, 0.5)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.zero3_init_flag is False


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_gives_ddps_losses_and_resumes_after_a_kill(strategy, ddp_run, tmp_path):
    ref_out = ddp_run[0]
    out = tmp_path / "run"
    # 1. Killed right after the step-8 checkpoint (zero2), or while writing it (zero3: resume from step 4).
    stop = {"zero2": "SPECULATORS_TEST_EXIT_AFTER_STEP", "zero3": "SPECULATORS_TEST_EXIT_DURING_SAVE"}[strategy]
    res = launch(strategy, out, env={stop: "8"})
    assert res.returncode != 0, res.stdout[-4000:]
    log = res.stdout
    assert "2 process(es), backend deepspeed, device cpu" in log, log[-3000:]
    assert ("target sharded" if strategy == "zero3" else "target replicated") in log, log[-3000:]
    resume_at = 8 if strategy == "zero2" else 4
    done = [p.name for p in sorted((out / "checkpoints").iterdir()) if not p.name.endswith(".tmp")]
    assert done == [f"step_{s:08d}" for s in (4, 8) if s <= resume_at], done
    assert_deepspeed_checkpoint(out / f"checkpoints/step_{resume_at:08d}")
    before = losses(out)  # steps 1-8 were trained (and logged) before the kill
    assert sorted(before) == list(range(1, 9))
    for step, values in before.items():
        assert values == pytest.approx(losses(ref_out)[step], **TOL), f"step {step}, before the kill"

    # 2. --resume auto to the end: the uninterrupted DDP run's losses at every step, the resumed ones included.
    res = launch(strategy, out, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-4000:]
    log = res.stdout
    assert f"[resume] from {out / 'checkpoints'}/step_{resume_at:08d}" in log, log[-3000:]
    assert f"[resume] step {resume_at}," in log, log[-3000:]
    assert_same_losses(losses(out), losses(ref_out))
    assert {r["stage"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())} == {1, 2}
    assert_deepspeed_checkpoint(out / "checkpoints/step_00000012")
    assert not list((out / "checkpoints").glob("*.tmp"))
    state = json.loads((out / "checkpoints/step_00000012/trainer_state.json").read_text())
    ref_state = json.loads((ref_out / "checkpoints/step_00000012/trainer_state.json").read_text())
    assert state["step"] == 12 and state["world_size"] == 2 and state["tokens"] == ref_state["tokens"]
    assert json.loads((out / "eval.json").read_text())["step"] == 12
    assert_same_heads(out, ref_out)
    assert_same_heads(out / "checkpoints/step_00000012/heads", ref_out)


@pytest.mark.parametrize("first,then", [("ddp", "zero2"), ("fsdp2", "zero3"), ("zero3", "fsdp2")])
def test_checkpoint_resumes_between_deepspeed_and_the_other_strategies(first, then, ddp_run, tmp_path):
    """Killed after the step-8 checkpoint under one strategy, resumed under the other: the heads' fp32 weights, Adam
    moments and step cross the layouts (DeepSpeed's flat ZeRO partitions <-> whole / FSDP2-sharded tensors), and
    steps 9-12 give the uninterrupted DDP run's losses."""
    out = tmp_path / "run"
    res = launch(first, out, env={"SPECULATORS_TEST_EXIT_AFTER_STEP": "8"})
    assert res.returncode != 0, res.stdout[-4000:]
    if first.startswith("zero"):
        assert_deepspeed_checkpoint(out / "checkpoints/step_00000008")
    res = launch(then, out, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-4000:]
    assert "was written under" in res.stdout and "[resume] step 8," in res.stdout, res.stdout[-3000:]
    assert_same_losses(losses(out), losses(ddp_run[0]))
    assert_same_heads(out, ddp_run[0])
