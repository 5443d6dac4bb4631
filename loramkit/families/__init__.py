"""Model families loramkit can prune: adding one is adding one small table here."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import ATTENTION_ROLES, MLP_ROLES, ArchSpec, Family, Role
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3)}


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
