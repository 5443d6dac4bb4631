"""Model families loramkit can prune: adding one is adding one small table here.

Adding a family
---------------
1. Check that it is a LLaMA-style decoder in transformers (read its ``modeling_*.py``):
   per layer, attention with q/k/v/o projections whose query heads are grouped over
   key/value heads, and a gated MLP (gate, up, down). What sits around them (norms,
   soft-capping, sliding windows, scaled embeddings) needs no code as long as it acts on
   hidden_size or on one head: it is copied whole.
2. Write ``families/<name>.py``: a :class:`Family` naming each role's module relative to
   a decoder layer (usually ``replace(LLAMA, ...)``), its ``architectures`` and
   ``model_types``; ``head_norms`` for norms over head_dim (never pruned), ``bias_roles``
   for biases the config does not announce, ``layer_norms`` when a layer has more than two
   hidden-size norms (parameter counts), and the same module name for roles that one
   fused module holds (rows in role order, as Phi-3's ``qkv_proj``).
3. Register it in ``FAMILIES`` below.
4. If the attention module reads head counts from the shared config in ``forward`` (Phi-3
   does), check that the loader's per-layer patch (``loramkit.model.loader``) covers it.
   A mixture of experts names its MLP roles with ``{expert}`` (one module per expert on
   disk) and sets ``experts`` / ``router`` (see ``qwen3_moe.py``); the fused in-memory
   layout (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) is the one transformers'
   Qwen3-MoE uses: a family whose experts differ needs ``geometry.expert_source`` taught.
5. Add a tiny case to ``tests/factory.py`` (shape rules of the real model, 8 layers) and a
   published config to ``tests/data`` with its parameter count: the parametrized tests
   (prune, load, recover, merge, quantize, validate) then run on it.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import ATTENTION_ROLES, MLP_ROLES, ArchSpec, Family, Role
from .gemma import GEMMA2, GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, QWEN3_MOE)}


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_for_config(config: dict[str, Any]) -> Family:
    """The family of a transformers config.json, by architecture then model_type."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs) or (not archs and model_type in family.model_types):
            return family
    supported = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
    found = ", ".join(archs) or f"model_type {model_type!r}"
    raise UnsupportedModelError(f"unsupported architecture {found}; loramkit supports {supported}")


__all__ = [
    "ATTENTION_ROLES",
    "MLP_ROLES",
    "ArchSpec",
    "FAMILIES",
    "Family",
    "Role",
    "family_by_name",
    "family_for_config",
]
