"""Qwen3-MoE: Qwen3's attention and, in every layer, a mixture of experts as the MLP.

Each expert is a gated MLP of ``moe_intermediate_size`` channels; pruning removes the same
number of channels from every expert of a layer, each expert choosing its own (so the
fused expert tensors stay rectangular), and keeps the router whole. On disk each expert
has its own ``gate_proj`` / ``up_proj`` / ``down_proj``; transformers fuses them on load.
"""

from dataclasses import replace

from .qwen3 import QWEN3

QWEN3_MOE = replace(
    QWEN3,
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    modules={
        **QWEN3.modules,
        "gate": "mlp.experts.{expert}.gate_proj",
        "up": "mlp.experts.{expert}.up_proj",
        "down": "mlp.experts.{expert}.down_proj",
    },
    experts="mlp.experts",
    router="mlp.gate",
)
