"""Candidate trees: the chain is the heads' greedy path; trees keep the best paths by summed log-probability."""

import itertools
import math

import pytest
import torch

from speculators import MLPSpeculator, MLPSpeculatorConfig
from speculators.tree import propose

V, E = 50, 16


def heads_for(**kw):
    torch.manual_seed(0)
    return MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=3, **kw)).eval()


def brute_force_paths(heads, state, token, top_k):
    """Every path of the tree with its summed log-prob, by running the heads one path at a time."""
    spec = heads.speculator
    out = []

    def walk(i, s, row, path, lp):
        if i == len(top_k):
            out.append((lp, path))
            return
        s = spec.step(i, s, row)
        logp = torch.log_softmax(spec.logits(i, s).double(), -1)
        vals, ids = logp.topk(top_k[i])
        for v, t in zip(vals.tolist(), ids.tolist()):
            target_id = t if spec.draft_to_target is None else spec.draft_to_target[t].item()
            walk(i + 1, s, torch.tensor(t), path + [target_id], lp + v)

    walk(0, spec.prepare_state(state), spec.target_to_draft(token), [], 0.0)
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("draft", [0, 20])
def test_tree_keeps_best_paths(draft):
    heads = heads_for(draft_vocab_size=draft)
    if draft:
        heads.set_draft_vocab(torch.randperm(V)[:draft])
    state, token = torch.randn(2, E), torch.randint(0, V, (2,))
    with torch.no_grad():
        cand = propose(heads, state, token, top_k=[3, 2, 2], n_candidates=5)
        assert cand.tokens.shape == (2, 5, 3) and cand.log_probs.shape == (2, 5)
        for b in range(2):
            ref = brute_force_paths(heads, state[b], token[b], [3, 2, 2])[:5]
            assert [p for _, p in ref] == cand.tokens[b].tolist()
            assert torch.allclose(cand.log_probs[b].double(), torch.tensor([lp for lp, _ in ref], dtype=torch.float64), atol=1e-4)
            assert torch.allclose(cand.head_log_probs[b].sum(-1), cand.log_probs[b], atol=1e-5)


def test_chain_is_greedy_teacher_forcing():
    heads = heads_for()
    state, token = torch.randn(1, E), torch.randint(0, V, (1,))
    with torch.no_grad():
        chain = propose(heads, state, token, top_k=[1, 1, 1], n_candidates=1).tokens[0, 0]
        # Teacher-forced forward on the chain itself must pick the same tokens.
        inds = torch.cat([token, chain]).unsqueeze(0)
        logits = heads(state.unsqueeze(1), inds)  # [3, 1, 1, V]
    assert logits[:, 0, 0].argmax(-1).tolist() == chain.tolist()


def test_bad_tree_shapes_are_refused():
    heads = heads_for()
    with pytest.raises(ValueError, match="1..n_predict = 3 entries"):
        propose(heads, torch.randn(1, E), torch.tensor([1]), top_k=[1] * 4, n_candidates=1)
    with pytest.raises(ValueError, match=r"n_candidates must be in 1..4"):
        propose(heads, torch.randn(1, E), torch.tensor([1]), top_k=[2, 2], n_candidates=5)
