"""MLP speculator heads (IBM "accelerator" architecture, arXiv 2404.19124) for any Hugging Face causal LM.

    from speculators import MLPSpeculator, MLPSpeculatorConfig
    heads = MLPSpeculator.from_pretrained("ibm-ai-platform/llama3-8b-accelerator")

Training lives in `speculators.train` (train/ in a checkout), the runtime in `speculators.infer` (infer/).
"""

from transformers import AutoConfig, AutoModel

from speculators.config import MLPSpeculatorConfig
from speculators.hub import HubError, ModelCardInfo, push_heads_to_hub
from speculators.model import MLPSpeculator, MLPSpeculatorPreTrainedModel
from speculators.target import TargetAdapter, TargetOutput, check_compatible, load_target

__version__ = "0.1.0"

# So that AutoConfig / AutoModel resolve "mlp_speculator" checkpoints once this package is imported.
AutoConfig.register("mlp_speculator", MLPSpeculatorConfig, exist_ok=True)
AutoModel.register(MLPSpeculatorConfig, MLPSpeculatorPreTrainedModel, exist_ok=True)

__all__ = [
    "HubError",
    "MLPSpeculator",
    "MLPSpeculatorConfig",
    "MLPSpeculatorPreTrainedModel",
    "ModelCardInfo",
    "TargetAdapter",
    "TargetOutput",
    "check_compatible",
    "load_target",
    "push_heads_to_hub",
]
