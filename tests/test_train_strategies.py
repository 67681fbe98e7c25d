"""DDP and FSDP2 on the CPU, two processes over gloo (issue 7, the part a CPU can do): the same seed gives the same
per-step losses under both, and a checkpoint written under one strategy resumes under the other, continuing with
the same step count and the uninterrupted run's losses.

The smoke recipe, shortened: 12 steps, stage 2 (the target's own continuations) from step 7, checkpoints every 4
steps. The interrupted runs stop right after the step-8 checkpoint, which falls inside a stage-2 pool (generated
for steps 8 and 9), so the per-rank pool state crosses strategies too. recipes/accelerate/cpu-2proc-fsdp2.yaml is
the CPU twin of fsdp2.yaml (train/parallel.py turns accelerate's FSDP on for CPU processes).
DeepSpeed (ZeRO-2 and ZeRO-3 on the CPU, same-seed losses, kill and resume) is in tests/test_train_deepspeed.py.
"""

import json
import subprocess
from pathlib import Path

import pytest
import strategy_runs
from strategy_runs import ROOT, assert_same_heads, assert_same_losses, losses

CONFIGS = {"ddp": "recipes/accelerate/cpu-2proc.yaml", "fsdp2": "recipes/accelerate/cpu-2proc-fsdp2.yaml"}
STOP_AT = 8  # the interrupted runs exit right after this step's checkpoint


def launch(strategy: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The shortened smoke recipe under `accelerate launch` with two CPU processes (torchrun + gloo)."""
    return strategy_runs.launch(["--config_file", str(ROOT / CONFIGS[strategy])], out, *extra, env=env)


def layout(checkpoint: Path) -> str:
    if (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir():
        return "fsdp2"  # sharded (torch.distributed.checkpoint directories)
    if (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.bin").is_file():
        return "ddp"  # whole tensors
    return "?"


def uninterrupted(strategy: str, tmp_path_factory):
    return strategy_runs.timed_run(["--config_file", str(ROOT / CONFIGS[strategy])], tmp_path_factory.mktemp(f"ref-{strategy}"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return uninterrupted("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    return uninterrupted("fsdp2", tmp_path_factory)


def test_ddp_and_fsdp2_give_the_same_losses_for_the_same_seed(ddp_run, fsdp2_run):
    (ddp_out, ddp_log, ddp_s), (fsdp_out, fsdp_log, fsdp_s) = ddp_run, fsdp2_run
    assert "2 process(es), backend ddp, device cpu" in ddp_log and "target replicated" in ddp_log, ddp_log[-3000:]
    # FSDP2 really ran: the target sharded, the heads' checkpoints sharded (not a silent fall-back to DDP).
    assert "2 process(es), backend fsdp2, device cpu" in fsdp_log and "target sharded" in fsdp_log, fsdp_log[-3000:]
    assert layout(ddp_out / "checkpoints/step_00000012") == "ddp"
    assert layout(fsdp_out / "checkpoints/step_00000012") == "fsdp2"
    assert_same_losses(losses(fsdp_out), losses(ddp_out))
    assert {r["stage"] for r in map(json.loads, (fsdp_out / "train_log.jsonl").read_text().splitlines())} == {1, 2}
    assert_same_heads(fsdp_out, ddp_out)
    for name, out in (("ddp", ddp_out), ("fsdp2", fsdp_out)):
        assert json.loads((out / "eval.json").read_text())["step"] == 12, name
    assert ddp_s < 60 and fsdp_s < 60, (ddp_s, fsdp_s)


@pytest.mark.parametrize("first,then", [("ddp", "fsdp2"), ("fsdp2", "ddp")])
def test_checkpoint_resumes_under_the_other_strategy(first, then, ddp_run, tmp_path):
    out = tmp_path / "run"
    res = launch(first, out, env={"SPECULATORS_TEST_EXIT_AFTER_STEP": str(STOP_AT)})
    assert res.returncode != 0  # stopped on purpose
    ckpts = [p.name for p in sorted((out / "checkpoints").iterdir())]
    assert ckpts == ["step_00000004", "step_00000008"], ckpts
    assert layout(out / "checkpoints/step_00000008") == first

    res = launch(then, out, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-4000:]
    log = res.stdout
    assert f"backend {then}" in log
    assert "[resume] from" in log and "step_00000008" in log, log[-3000:]
    assert "was written under" in log  # the cross-layout path, not accelerate's own load_state
    assert f"[resume] step {STOP_AT}," in log
    assert layout(out / "checkpoints/step_00000012") == then
    state = json.loads((out / "checkpoints/step_00000012/trainer_state.json").read_text())
    ref_state = json.loads((ddp_run[0] / "checkpoints/step_00000012/trainer_state.json").read_text())
    assert state["step"] == 12 and state["world_size"] == 2 and state["tokens"] == ref_state["tokens"]
    assert json.loads((out / "eval.json").read_text())["step"] == 12
    # Steps 1-8 from the first strategy, 9-12 from the second: the uninterrupted run's losses throughout.
    assert_same_losses(losses(out), losses(ddp_run[0]))
    assert_same_heads(out, ddp_run[0])


def test_a_random_target_too_large_for_one_process_is_built_shard_by_shard(tmp_path):
    """random_target_init: sharded (recipes/llama-70b-shape-random.yaml): under FSDP2 no process builds the whole
    target; the shards are drawn on each process, and the heads train on it like on any target."""
    out = tmp_path / "run"
    res = launch("fsdp2", out, "--random_target_init", "sharded", "--stage2_start_step", "null", "--loss", "hard")
    assert res.returncode == 0, res.stdout[-4000:]
    assert "target sharded" in res.stdout
    steps = losses(out)
    assert sorted(steps) == list(range(1, 13)) and all(v[0] == v[0] for v in steps.values())  # no NaN
    assert steps[12][0] < steps[1][0]

    res = launch("ddp", tmp_path / "ddp", "--random_target_init", "sharded")
    assert res.returncode != 0 and "random_target_init: sharded needs a sharded target" in res.stdout, res.stdout[-3000:]
