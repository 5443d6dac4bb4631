"""Phi-3 (mini, small, medium): the LLaMA roles in two fused projections.

``self_attn.qkv_proj`` holds the q, k and v rows one after the other ([Q | K | V]) and
``mlp.gate_up_proj`` the gate and up rows ([gate | up]): pruning keeps whole KV groups in
all three segments and the same channels in both MLP halves. Phi3Attention splits qkv at
``config.num_attention_heads * head_dim``, so the loader gives each pruned layer's
attention its own head counts (see :mod:`loramkit.model.loader`).
"""

from .base import Family

PHI3 = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    model_types=("phi3",),
    modules={
        "q": "self_attn.qkv_proj",
        "k": "self_attn.qkv_proj",
        "v": "self_attn.qkv_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_up_proj",
        "up": "mlp.gate_up_proj",
        "down": "mlp.down_proj",
    },
)
