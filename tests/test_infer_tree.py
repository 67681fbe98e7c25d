"""Trees of unique prefixes, their masks, the acceptance walk, and KV compaction, against brute force."""

import itertools

import pytest
import torch
from test_infer_common import VOCAB, greedy_reference, ids, one_thread, target  # noqa: F401

from speculators.infer import SamplingParams
from speculators.infer.engine import LLMEngine
from speculators.infer.llm import load_causal_lm
from speculators.infer.tree import TreeShape, accept, build_tree, cache_mask


def brute_force(root_y_node, cand, y):
    """Walk prefixes explicitly: (accepted count, emitted tokens) for one row."""
    n, h = len(cand), len(cand[0])
    node = {(): 0}
    for p, d in itertools.product(range(n), range(h)):
        node.setdefault(tuple(cand[p][: d + 1]), 1 + p * h + d)
    cur, emitted = (), []
    while True:
        t = y[node[cur]]
        emitted.append(t)
        if cur + (t,) not in node:
            return len(cur), emitted
        cur = cur + (t,)


@pytest.mark.parametrize("n,h", [(1, 3), (4, 2), (5, 3), (6, 4)])
def test_accept_matches_brute_force(n, h):
    g = torch.Generator().manual_seed(n * 10 + h)
    B = 64
    cand = torch.randint(0, 3, (B, n, h), generator=g)  # 3 tokens: many shared prefixes and duplicate paths
    root = torch.randint(0, 3, (B,), generator=g)
    tree = build_tree(root, cand)
    N = 1 + n * h
    y = torch.randint(0, 3, (B, N), generator=g)  # with 3 tokens, most nodes have a child matching y
    a, path = accept(tree.tokens, tree.canon, y)
    emitted = y.gather(1, path)
    deep = 0
    for b in range(B):
        ref_a, ref_emitted = brute_force(None, cand[b].tolist(), y[b].tolist())
        assert a[b].item() == ref_a
        assert emitted[b, : ref_a + 1].tolist() == ref_emitted
        deep += ref_a >= 2
    assert deep > 0


def test_tree_mask_is_ancestry():
    g = torch.Generator().manual_seed(0)
    n, h = 5, 3
    cand = torch.randint(0, 3, (8, n, h), generator=g)
    tree = build_tree(torch.zeros(8, dtype=torch.long), cand)
    assert tree.tokens.shape == (8, 1 + n * h) and tree.depth.tolist() == [0] + [1, 2, 3] * n
    for b in range(8):
        prefix = {0: ()}
        for p, d in itertools.product(range(n), range(h)):
            prefix[1 + p * h + d] = tuple(cand[b, p, : d + 1].tolist())
        canonical = {j for j in prefix if j == 0 or tree.canon[b].view(-1)[j - 1].item() == j}
        for i in canonical:
            for j in canonical:
                expected = prefix[i][: len(prefix[j])] == prefix[j]
                assert tree.mask[b, i, j].item() == expected, (b, i, j)


def test_cache_mask():
    tree = build_tree(torch.tensor([1, 2]), torch.tensor([[[3, 4], [3, 5]], [[6, 7], [8, 9]]]))
    seq_len = torch.tensor([3, 7])
    m = cache_mask(tree.mask, seq_len, 16)  # [2, 1, 5, 16]
    assert m.shape == (2, 1, 5, 16)
    for b, L in enumerate(seq_len.tolist()):
        for i in range(5):
            row = m[b, 0, i]
            assert row[:L].all() and not row[L + 5 :].any()
            assert row[L : L + 5].tolist() == tree.mask[b, i].tolist()
    # row 0: node 3 (path 1's first token) duplicates node 1, so node 4 = (3, 5) hangs below node 1
    assert tree.canon[0].tolist() == [[1, 2], [1, 4]]
    assert tree.mask[0, 4].tolist() == [True, True, False, False, True]


def test_plain_tree():
    tree = build_tree(torch.tensor([4, 5]), None)
    a, path = accept(tree.tokens, tree.canon, torch.tensor([[9], [8]]))
    assert tree.tokens.tolist() == [[4], [5]] and a.tolist() == [0, 0] and path.tolist() == [[0], [0]]


def test_compact_moves_every_layer():
    model, d = target("llama")
    ours, _, _ = load_causal_lm(d, torch.float64, torch.device("cpu"), 64, "own")
    ours.setup_cache(3, 32)
    ours.kv.copy_(torch.randn_like(ours.kv))
    before = ours.kv.clone()
    src, dst = torch.tensor([[7, 9], [12, 5]]), torch.tensor([[5, 6], [1, 2]])
    ours.compact(slice(1, 3), src, dst)
    assert torch.equal(ours.kv[:, :, 0], before[:, :, 0])  # other rows untouched
    for r, row in enumerate((1, 2)):
        for s, t in zip(src[r].tolist(), dst[r].tolist()):
            assert torch.equal(ours.kv[:, :, row, :, t], before[:, :, row, :, s])


class OracleDrafter:
    """Knows the target's greedy continuation (one request): puts it on path 2 of a 4-path tree whose path 1
    shares its first token and then diverges, so the accepted nodes are non-first paths' (and canonical nodes
    of two different paths). Every 5th step the oracle path is cut after one token."""

    depth = 3

    def __init__(self, sequence):
        self.seq = sequence
        self.calls = 0
        self.shape = TreeShape((3, 2, 2), 4)

    def shapes(self):
        return [TreeShape(), self.shape]

    def setup(self, *args):
        pass

    def prefill(self, *args):
        pass

    def draft(self, shape, hidden, root, prev, seq_len, rows, S):
        self.calls += 1
        B = root.size(0)
        cand = torch.full((B, 4, 3), 3, dtype=torch.long)
        L = int(seq_len[0])
        truth = (self.seq[L + 1 : L + 4] + [3, 3, 3])[:3]
        wrong = [(t + 1) % VOCAB for t in truth]
        cand[0, 0] = torch.tensor(wrong)
        cand[0, 1] = torch.tensor([truth[0], wrong[1], wrong[2]])
        cand[0, 2] = torch.tensor(truth if self.calls % 5 else [truth[0], wrong[1], truth[2]])
        cand[0, 3] = torch.tensor([wrong[0], truth[1], truth[2]])
        return cand


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_non_first_paths_compact_correctly(arch):
    model, d = target(arch)
    prompt = [9, 8, 7, 6, 5]
    ref = greedy_reference(model, prompt, 40)
    ours, _, _ = load_causal_lm(d, torch.float64, torch.device("cpu"), 128, "own")
    drafter = OracleDrafter(prompt + ref)
    engine = LLMEngine(ours, drafter=drafter, max_model_len=128, max_num_seqs=2, device="cpu", adaptive=False)
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert ids(outs) == [ref]
    per_step = outs[0].metrics.tokens_per_step[1:-1]
    assert per_step.count(4) >= 5 and 2 in per_step  # full paths and cut paths both happened
