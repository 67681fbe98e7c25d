"""The training job end to end on the CPU: the smoke recipe with two processes (DDP over gloo), a kill at any moment
and `--resume auto` reproducing the uninterrupted run's per-step losses, atomic checkpoints, --push_to_hub without
network, config errors; plus the acceptance simulator against a brute-force loop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speculators import MLPSpeculator, MLPSpeculatorConfig
from speculators.train.acceptance import AcceptanceStats, Tree, accepted_lengths, evaluate_generated, parse_tree
from speculators.train.config import ConfigError, TrainConfig, load_config
from speculators.tree import propose

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def launch(out: Path, *extra: str, env: dict | None = None, wait: bool = True):
    """The smoke recipe under `accelerate launch` with two CPU processes (torchrun + gloo)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/cpu-2proc.yaml"),
        str(ROOT / "train/distill.py"), "--config", str(ROOT / "recipes/smoke-cpu.yaml"),
        "--output_dir", str(out), "--progress_bar", "false", *extra,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                "MLP_SPECULATORS_CACHE": "off", **(env or {})}
    kw = dict(cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return subprocess.Popen(cmd, start_new_session=True, **kw)
    return subprocess.run(cmd, timeout=300, **kw)


def losses(out: Path) -> dict[int, list[float]]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]
    by_step = {r["step"]: [r["loss"], *r["head_loss"]] for r in rows}
    assert len(by_step) == len(rows), "a step was logged twice"
    return by_step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, which also asks to push to the Hub with no network."""
    out = tmp_path_factory.mktemp("ref")
    t0 = time.time()
    res = launch(out, "--push_to_hub", "nobody/speculator-test")
    return out, res, time.time() - t0


def test_smoke_run_end_to_end_with_two_processes(reference):
    out, res, seconds = reference
    assert "2 process(es), backend ddp" in res.stdout, res.stdout[-3000:]
    heads = MLPSpeculator.from_pretrained(out)
    assert heads.config.n_predict == 3 and heads.config.draft_vocab_size == 128
    assert heads.speculator.head[0].weight.dtype == torch.bfloat16  # saved as served
    # Every complete checkpoint carries its heads too, so a run cut off between checkpoints still leaves heads.
    last = MLPSpeculator.from_pretrained(out / "checkpoints/step_00000020/heads")
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), heads.state_dict().values()))
    assert torch.equal(last.draft_to_target, heads.draft_to_target)
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    for key in ("data/chain/tau", "data/tree/tau", "generated/chain/tau", "generated/tree/tau_walk", "data/acc_head0"):
        assert key in metrics
    assert metrics["data/tree/tau"] >= metrics["data/chain/tau"] >= 1.0
    assert (out / "acceptance.png").stat().st_size > 0
    steps = losses(out)
    assert sorted(steps) == list(range(1, 21))
    assert sum(steps[20][1:]) < sum(steps[1][1:])  # it learns something


def test_push_without_network_fails_clearly_and_keeps_output(reference):
    out, res, _ = reference
    assert res.returncode != 0, res.stdout[-3000:]
    assert "could not push to the Hugging Face Hub repo 'nobody/speculator-test'" in res.stdout
    assert f"intact in {out}" in res.stdout
    for name in ("config.json", "model.safetensors", "eval.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / ".hub-upload").exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000015", "step_00000020"]


def test_kill_anywhere_then_resume_auto_reproduces_the_losses(reference, tmp_path):
    ref_out = reference[0]
    out = tmp_path / "run"
    # 1. Killed while writing the step-15 checkpoint: a half checkpoint is left behind.
    res = launch(out, env={"SPECULATORS_TEST_EXIT_DURING_SAVE": "15"})
    assert res.returncode != 0
    assert (out / "checkpoints/step_00000015.tmp").is_dir()
    assert [p.name for p in sorted((out / "checkpoints").iterdir()) if not p.name.endswith(".tmp")] == ["step_00000005", "step_00000010"]
    # 2. Resume picks step 10 (not the half step 15), and is SIGKILLed at a random moment once step 15 is saved.
    proc = launch(out, "--resume", "auto", wait=False)
    deadline = time.time() + 200
    while not (out / "checkpoints/step_00000015/trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(float(torch.rand(()).item()) * 1.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0]
    assert "[resume] from" in log and "step_00000010" in log, log[-3000:]
    # 3. Resume again to the end.
    res = launch(out, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-3000:]
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == sorted(want) == list(range(1, 21))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=0), f"step {step}"
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr' in the command line \(did you mean 'lr'\?\)"):
        load_config(["--config", str(ROOT / "recipes/smoke-cpu.yaml"), "--lrr", "1e-3"])
    with pytest.raises(ConfigError, match="seq_len must be a positive integer"):
        load_config(["--seq_len", "0"])
    with pytest.raises(ConfigError, match="loss must be one of"):
        load_config(["--loss", "l2"])


def test_bad_recipe_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: random:llama\nn_predcit: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'n_predcit' in recipe .*bad.yaml \(did you mean 'n_predict'\?\)"):
        load_config(["--config", str(bad)])


def test_cli_overrides_file_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.01\nmax_steps: 7\nstage2_start_step: 3\n")
    cfg = load_config(["--config", str(recipe), "--max_steps=9", "--betas", "[0.8, 0.9]", "--push_to_hub", "a/b"])
    assert (cfg.lr, cfg.max_steps, cfg.betas, cfg.push_to_hub, cfg.stage2_start_step) == (0.01, 9, [0.8, 0.9], "a/b", 3)
    assert cfg.seq_len == TrainConfig().seq_len
    assert load_config(["--config", str(recipe), "--stage2_start_step", "null"]).stage2_start_step is None
    assert load_config(["--config", str(recipe), "--lr", "1e-3"]).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    recipe.write_text("lr: 3e-4\n")
    assert load_config(["--config", str(recipe)]).lr == 3e-4


def test_distill_cli_reports_config_errors_without_traceback(capsys):
    from speculators.train.distill import main

    assert main(["--config", str(ROOT / "recipes/smoke-cpu.yaml"), "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'bogus'" in err and "Traceback" not in err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    cfg = load_config(["--config", str(recipe)])
    assert cfg.output_dir and cfg.max_steps > 0


def test_config_fields_have_docstrings():
    source = (ROOT / "train/config.py").read_text()
    for f in TrainConfig.__dataclass_fields__:
        block = source.split(f"\n    {f}:", 1)[1].split("\n", 2)
        assert block[1].strip().startswith('"""'), f"field {f} has no docstring"


# ---- the acceptance simulator --------------------------------------------------------------------------------


def test_accepted_lengths_match_a_per_position_loop():
    torch.manual_seed(0)
    V, E, n = 40, 16, 3
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=n)).eval()
    B, S = 2, 12
    hidden = torch.randn(B, S, E)
    ids = torch.randint(0, V, (B, S + n + 2))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :3] = False
    # Make some references follow the heads' own greedy chain so that acceptance is not always 0.
    with torch.no_grad():
        for t in (2, 5):
            chain = propose(heads, hidden[0, t : t + 1], ids[0, t + 1 : t + 2], [1] * n, 1).tokens[0, 0]
            ids[0, t + 2 : t + 2 + n] = chain
    for tree in (Tree("chain", [1] * n, 1), Tree("tree", [3, 2, 2], 4)):
        got = accepted_lengths(heads, hidden, ids, valid, tree, budget=V * 30)  # several chunks
        for b in range(B):
            for t in range(S):
                if not valid[b, t]:
                    assert got[b, t] == -1
                    continue
                with torch.no_grad():
                    cand = propose(heads, hidden[b, t : t + 1], ids[b, t + 1 : t + 2], tree.top_k, tree.n_candidates).tokens[0]
                best = 0
                for c in cand.tolist():
                    k = 0
                    while k < n and c[k] == ids[b, t + 2 + k].item():
                        k += 1
                    best = max(best, k)
                assert got[b, t].item() == best
        if tree.name == "chain":
            assert got[0, 2] == n and got[0, 5] == n


def test_tree_sweep_on_the_targets_own_text():
    """eval_heads --trees: more shapes on the same continuations; a tree whose candidates include another's
    (same top-k, more candidates) never accepts less, and bad specs name the problem."""
    from tiny_models import tiny_target

    assert parse_tree("8,5,3,2x16", 4) == Tree("tree[8,5,3,2]x16", [8, 5, 3, 2], 16)
    for bad, msg in (("8,5x", "TOP_K"), ("3,2x7", "candidates <= 6"), ("2,2,2,2,2x1", "n_predict = 4")):
        with pytest.raises(ValueError, match=msg):
            parse_tree(bad, 4)
    torch.manual_seed(0)
    target = tiny_target()
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=128, emb_dim=32, n_predict=3, top_k_tokens_per_head=[3, 2, 2],
                                              n_candidates=3)).eval()
    prompts = [[5, 9, 13, 40], [7, 7, 21]]
    trees = [parse_tree("3,2,2x12", 3), parse_tree("4,2x2", 3)]
    m = evaluate_generated(target, heads, prompts, max_new_tokens=20, batch_size=2, pad_id=0, eos_ids=[], trees=trees)
    assert m["generated/tree[3,2,2]x12/tau"] >= m["generated/tree/tau"] >= m["generated/chain/tau"] >= 1.0
    assert m["generated/tree[4,2]x2/positions"] == m["generated/tree/positions"] > 0
    assert m["generated/tree[4,2]x2/accept_rate_head2"] == 0.0  # two heads used: never 3 tokens


def test_stats_tau_and_decoder_walk():
    stats = AcceptanceStats(3)
    acc = torch.tensor([[2, 0, 1, 3, 0, -1], [1, 1, -1, -1, -1, -1]])
    stats.add(acc, starts=[0, 0])
    s = stats.summary("x")
    assert s["x/tau"] == pytest.approx(1 + 8 / 7)
    assert s["x/accept_rate_head0"] == pytest.approx(5 / 7)
    assert s["x/accept_cond_head1"] == pytest.approx(2 / 5)
    # Walk row 0: t=0 accepts 2 -> t=3 accepts 3 -> t=7 (out): 7 tokens in 2 steps; row 1: t=0 -> t=2 (invalid): 2 in 1.
    assert s["x/tau_walk"] == pytest.approx(9 / 3)
    again = AcceptanceStats.from_vector(3, stats.vector())
    assert again.summary("x") == s


def test_stage2_pool_epochs_reuse_rows_and_resume_exactly():
    """With stage2_pool_epochs 2, each generated pool is served twice (reshuffled) before the target generates
    again, and a pool restored from its state_dict serves exactly the batches the original would have."""
    from train.config import TrainConfig
    from train.generate import Stage2Pool

    class CountingTeacher:
        calls = 0

        def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
            CountingTeacher.calls += 1
            new = torch.arange(generation_config.max_new_tokens).expand(input_ids.size(0), -1) + 1000 * CountingTeacher.calls
            return torch.cat([input_ids, new], dim=1)

    def data():
        step = 0
        while True:
            step += 1
            yield torch.arange(4 * 32).reshape(4, 32) + 10_000 * step

    cfg = TrainConfig(target="random:llama", data="x", seq_len=30, batch_size=2, stage2_start_step=0, stage2_prompt_len=8,
                      stage2_new_tokens=8, stage2_pool_steps=2, stage2_pool_epochs=2, stage2_batch_size=2)
    pool = Stage2Pool(cfg, CountingTeacher(), data(), torch.device("cpu"), 0, [], 0, False)
    first = [next(pool)]
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in pool.state_dict().items()}
    first.append(next(pool))  # the first pass over a pool of 2 steps x 2 rows
    second = [next(pool) for _ in range(2)]  # the second pass: the same rows in another order, no generation
    assert CountingTeacher.calls == 1
    assert sorted(map(tuple, torch.cat(first).tolist())) == sorted(map(tuple, torch.cat(second).tolist()))
    assert not torch.equal(torch.cat(first), torch.cat(second))
    next(pool)  # both passes done: the target generates a fresh pool
    assert CountingTeacher.calls == 2

    restored = Stage2Pool(cfg, CountingTeacher(), data(), torch.device("cpu"), 0, [], 0, False)
    restored.load_state_dict(state)  # as saved after the first batch: the same order in both passes
    assert all(torch.equal(a, next(restored)) for a in [first[1], *second])
    assert CountingTeacher.calls == 2


def test_stage2_chat_pool_packs_whole_answers_and_resumes_exactly():
    """stage2_prompts: chat: the target answers first-turn prompts (their last stage2_prompt_len tokens) until its
    EOS, and prompt + answer documents are packed into rows of the stage-1 length; the prompts' position is part of
    the state, so a restored pool generates from the same prompts; every rank generates until all have enough."""
    from train.config import TrainConfig
    from train.generate import Stage2Pool

    EOS = 99

    class AnsweringTeacher:
        calls = 0

        def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
            AnsweringTeacher.calls += 1
            assert generation_config.min_new_tokens in (0, None)  # EOS may end an answer
            rows = []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                prompt = [t for t, m in zip(ids, mask) if m]
                answer = [500 + prompt[-1]] * (prompt[-1] % 4) + [EOS]  # length depends on the prompt
                rows.append(ids + (answer + [0] * generation_config.max_new_tokens)[: generation_config.max_new_tokens])
            return torch.tensor(rows)

    prompts = [list(range(10 * k, 10 * k + 2 + k % 5)) for k in range(1, 13)]  # 2..6 tokens
    cfg = TrainConfig(target="random:llama", data="x", seq_len=12, n_predict=2, batch_size=2, stage2_start_step=0,
                      stage2_prompts="chat", stage2_prompt_len=4, stage2_new_tokens=6, stage2_pool_steps=2,
                      stage2_gen_batch_size=3)
    flags = []

    def all_ranks(flag):
        flags.append(flag)
        return flag

    pool = Stage2Pool(cfg, AnsweringTeacher(), iter(()), torch.device("cpu"), 0, [EOS], 0, False, prompts=prompts,
                      all_ranks=all_ranks)
    batch = next(pool)
    assert batch.shape == (2, 12 + 2 + 1) and pool.rows.shape == (4, 15)
    # The stream is prompt (its last 4 tokens) + answer up to its EOS, document after document.
    stream, docs = pool.rows.flatten().tolist(), []
    while stream:
        cut = stream.index(EOS) + 1 if EOS in stream else len(stream)
        docs.append(stream[:cut])
        stream = stream[cut:]
    for doc in docs[:-1]:
        prompt = next(p[-4:] for p in prompts if doc[: len(p[-4:])] == p[-4:])
        assert doc == prompt + [500 + prompt[-1]] * (prompt[-1] % 4) + [EOS]
    assert flags[-1] is True and flags[:-1] == [False] * (len(flags) - 1) and AnsweringTeacher.calls == len(flags) - 1
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in pool.state_dict().items()}
    rest = [next(pool) for _ in range(3)]  # the pool's second batch, then a fresh pool from the next prompts
    restored = Stage2Pool(cfg, AnsweringTeacher(), iter(()), torch.device("cpu"), 0, [EOS], 0, False, prompts=prompts)
    restored.load_state_dict(state)
    assert all(torch.equal(a, next(restored)) for a in rest)
    with pytest.raises(ValueError, match="stage2_prompts: chat needs chat records"):
        Stage2Pool(cfg, AnsweringTeacher(), iter(()), torch.device("cpu"), 0, [EOS], 0, False, prompts=[])


def test_student_output_flattens_to_its_tensors_for_fsdp2():
    """FSDP2 hooks its backward (unshard, reduce-scatter of the heads' gradients) on the tensors it finds by
    flattening the forward's output as a pytree; an opaque output type left the heads without gradients under FSDP2
    on GPUs (torch 2.11), while the loss still printed. The output must flatten into its tensors, the loss with grad."""
    from torch.utils._pytree import tree_flatten

    from speculators.train.student import Student

    torch.manual_seed(0)
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=50, emb_dim=16, inner_dim=16, n_predict=2))
    student = Student(heads, "hard", 0.5)
    out = student(torch.randn(2, 8, 16), torch.randint(0, 50, (2, 8 + 2 + 1)))
    leaves, _ = tree_flatten(out)
    assert len(leaves) == 4 and all(isinstance(t, torch.Tensor) for t in leaves)
    assert leaves[0] is out.loss and out.loss.requires_grad


def test_sharded_random_init_fills_a_meta_built_target_like_transformers_would():
    from speculators.train.models import init_sharded_random, random_target

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 320}
    meta = random_target("qwen2", shape, torch.float32, sharded=True)
    assert all(p.device.type == "meta" for p in meta.parameters())
    init_sharded_random(meta, torch.device("cpu"), seed=0, rank=0)
    whole = random_target("qwen2", shape, torch.float32)
    for (name, p), (_, q) in zip(meta.named_parameters(), whole.named_parameters()):
        assert p.device.type == "cpu" and p.shape == q.shape
        if p.dim() >= 2:
            assert abs(p.std().item() - meta.config.initializer_range) < 0.1 * meta.config.initializer_range, name
        else:
            torch.testing.assert_close(p, q, msg=name)  # norm weights 1, biases 0
    for (name, b), (_, c) in zip(meta.named_buffers(), whole.named_buffers()):
        torch.testing.assert_close(b, c, msg=name)  # rotary tables kept, not left uninitialised
    with pytest.raises(ConfigError, match="random_target_init: sharded is for random: targets"):
        load_config(["--target", "some/model", "--random_target_init", "sharded"])


def test_teacher_logits_once_for_all_heads_equal_per_chunk(monkeypatch):
    """Soft labels from the hidden states: the draft-vocabulary teacher logits computed once for every head (the
    default while they fit) give the loss and gradients of computing them per head and chunk, scale included."""
    from speculators.train import student as student_module
    from speculators.train.student import Student

    torch.manual_seed(0)
    heads = MLPSpeculator(MLPSpeculatorConfig(vocab_size=50, emb_dim=16, inner_dim=16, n_predict=3)).double()
    student = Student(heads, "mix", 0.7, chunk_tokens=5)
    hidden, ids = torch.randn(2, 9, 16, dtype=torch.float64), torch.randint(0, 50, (2, 6 + 3 + 1))
    lm = torch.randn(50, 16, dtype=torch.float64)

    def run():
        heads.zero_grad()
        out = student(hidden, ids, soft_weight=lm, soft_scale=0.5)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in heads.parameters()]

    once = run()
    monkeypatch.setattr(student_module, "TEACHER_LOGITS_ELEMENTS", 0)
    per_chunk = run()
    assert torch.allclose(once[0], per_chunk[0], rtol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(once[1], per_chunk[1]))
