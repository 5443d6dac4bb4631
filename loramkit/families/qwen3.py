"""Qwen3: the LLaMA layout plus per-head RMSNorm on q and k, over head_dim (never pruned)."""

from dataclasses import replace

from .llama import LLAMA

QWEN3 = replace(
    LLAMA,
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
)
