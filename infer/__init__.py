"""The speculative decoding runtime, with vLLM's API.

    from speculators.infer import LLM, SamplingParams
    llm = LLM(model="target-dir", speculative_config={"model": "heads-dir", "method": "mlp_speculator"})
    llm.generate(["def fib(n):"], SamplingParams(temperature=0.0, max_tokens=128))[0].outputs[0].text

Read first: llm.py (the API), engine.py (slots, the step, continuous batching), tree.py (trees, masks,
acceptance), sampling.py (lossless sampling), model.py (our transformer), cuda_graphs.py (speed).
"""

from speculators.infer.engine import LLMEngine
from speculators.infer.llm import LLM
from speculators.infer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from speculators.infer.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "RequestOutputKind"]
