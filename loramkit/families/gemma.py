"""Gemma 2 and Gemma 3 (text): the LLaMA projections with more around them.

Both have an explicit head_dim independent of hidden_size, four hidden-size norms per
layer (input, post-attention, pre- and post-feedforward; ``(1 + w)`` scaling), embeddings
scaled by sqrt(hidden_size) and tied to lm_head, and sliding-window layers. Gemma 2
soft-caps attention scores and final logits; Gemma 3 adds q/k RMSNorms over head_dim.
None of that is pruned: norms act on hidden_size or on one head, soft-capping and the
window are per score, so the projections alone carry the pruned units.
"""

from dataclasses import replace

from .llama import LLAMA

GEMMA2 = replace(
    LLAMA,
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    model_types=("gemma2",),
    layer_norms=4,
    tied_by_default=True,
)
GEMMA3 = replace(
    GEMMA2,
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
)
