"""The compiled step functions trace as whole graphs (fullgraph, dynamic shapes) and keep outputs exact.

On CPU this uses dynamo with the "eager" backend: the same tracing, guards and specialisations as inductor on
CUDA, without code generation, so a graph break or an unsupported op fails here rather than on a GPU.
"""

import warnings

import pytest
import torch
from test_infer_common import fitted_heads, greedy_reference, one_thread, perturbed, target  # noqa: F401

from speculators import MLPSpeculator
from speculators.infer import SamplingParams
from speculators.infer.cuda_graphs import compiled
from speculators.infer.drafter import DraftModelDrafter, MLPDrafter
from speculators.infer.engine import LLMEngine
from speculators.infer.llm import load_causal_lm

PROMPTS = [[5, 17, 33, 9], [7] * 20, [11]]


def run(engine, params):
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
    return [outs[str(i)] for i in range(len(PROMPTS))]


def build(method: str):
    """(our target, a drafter), freshly loaded: compiling swaps functions on them."""
    _, d = target("llama")
    ours, _, _ = load_causal_lm(d, torch.float64, torch.device("cpu"), 128, "own")
    if method == "heads":
        return ours, MLPDrafter(MLPSpeculator.from_pretrained(fitted_heads("llama")).double(), [3, 2, 2], 4)
    draft, _, _ = load_causal_lm(perturbed("llama", 0.2), torch.float64, torch.device("cpu"), 128, "own")
    return ours, DraftModelDrafter(draft, 3)


@pytest.mark.parametrize("method", ["heads", "draft"])
def test_fullgraph_tracing_keeps_outputs_exact(method):
    model, _ = target("llama")
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=8, ignore_eos=True, seed=1)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch.compile of")  # a fallback to eager fails the test
        ours, drafter = build(method)
        engine = LLMEngine(ours, drafter=drafter, max_model_len=128, max_num_seqs=4, device="cpu", compile_backend="eager")
        assert isinstance(engine.verify, compiled) and isinstance(ours.block, compiled)
        traced = run(engine, greedy), run(engine, sampled)
    assert traced[0] == [greedy_reference(model, p, 24) for p in PROMPTS]
    ours, drafter = build(method)
    eager = LLMEngine(ours, drafter=drafter, max_model_len=128, max_num_seqs=4, device="cpu", adaptive=False)
    assert run(eager, sampled) == traced[1]


def test_compile_failure_falls_back_to_eager():
    def needs_a_sync(x):
        return x * int(x.sum().item() > 0)  # data-dependent Python: no full graph

    fn = compiled(needs_a_sync, "needs_a_sync", backend="eager")
    with pytest.warns(UserWarning, match="torch.compile of needs_a_sync failed"):
        assert torch.equal(fn(torch.ones(3)), torch.ones(3))
    assert fn.failed and torch.equal(fn(torch.ones(2)), torch.ones(2))
