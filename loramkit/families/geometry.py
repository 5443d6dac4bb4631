"""Geometry of pruning units: per-layer dims and the index maps that kept units imply.

Shared by pruning (to slice), validation (to check a bundle) and recovery (to scatter):
the bundle format (specs/bundle-v1.md) is defined in these terms. Pure tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ATTENTION_ROLES, MLP_ROLES, ArchSpec


@dataclass(frozen=True)
class LayerDims:
    """Original and kept sizes of one decoder layer."""

    index: int
    pruned: bool
    heads: tuple[int, int]  # (original, kept) query heads
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]

    def to_json(self) -> dict:
        pair = lambda p: {"original": p[0], "kept": p[1]}  # noqa: E731
        return {
            "index": self.index,
            "pruned": self.pruned,
            "num_attention_heads": pair(self.heads),
            "num_key_value_heads": pair(self.kv_heads),
            "intermediate_size": pair(self.intermediate),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LayerDims":
        pair = lambda k: (int(d[k]["original"]), int(d[k]["kept"]))  # noqa: E731
        return cls(int(d["index"]), bool(d["pruned"]), pair("num_attention_heads"), pair("num_key_value_heads"), pair("intermediate_size"))



def unit_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Rows covered by whole units of ``width`` rows each: (n,) -> (n * width,), ascending."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def layer_index_maps(
    arch: ArchSpec, layer: int, kept_groups: torch.Tensor, kept_channels: torch.Tensor, tensor_names: set[str]
) -> dict[str, torch.Tensor]:
    """Index maps ``"<tensor>:<dim>" -> kept indices`` for every pruned tensor of one layer.

    ``kept_groups``: kept KV heads (== heads for MHA), ascending. A KV group g owns
    query heads g*G .. g*G+G-1, which own q rows / o columns head*head_dim .. +head_dim-1.
    Biases of row-pruned projections share the rows' map. A block that keeps all its
    units (attention at a low ratio) gets no maps: a map always removes something.
    """
    hd, G = arch.head_dim, arch.group_size
    by_kind = {
        "kv": unit_rows(kept_groups, hd),  # (kept_kv * hd,)
        "query": unit_rows(unit_rows(kept_groups, G), hd),  # (kept_kv * G * hd,)
        "channel": kept_channels,
    }
    whole = {
        "kv": len(kept_groups) == arch.num_key_value_heads,
        "query": len(kept_groups) == arch.num_key_value_heads,
        "channel": len(kept_channels) == arch.intermediate_size,
    }
    maps: dict[str, torch.Tensor] = {}
    for role, dim, kind in ATTENTION_ROLES + MLP_ROLES:
        if whole[kind]:
            continue
        module = arch.family.module(layer, role)
        maps[f"{module}.weight:{dim}"] = by_kind[kind]
        if dim == 0 and f"{module}.bias" in tensor_names:
            maps[f"{module}.bias:0"] = by_kind[kind]
    return {k: v.to(torch.int64).clone() for k, v in maps.items()}  # one tensor per key, for safetensors


def pruned_shape(shape: tuple[int, ...], name: str, maps: dict[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(len(maps[f"{name}:{d}"]) if f"{name}:{d}" in maps else s for d, s in enumerate(shape))


def slice_tensor(t: torch.Tensor, name: str, maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Keep the mapped indices along each mapped dimension of ``t``."""
    for d in range(t.dim()):
        idx = maps.get(f"{name}:{d}")
        if idx is not None:
            t = t.index_select(d, idx)
    return t.contiguous()


def count_parameters(arch: ArchSpec, layers: list[LayerDims]) -> int:
    """Parameters of a model with these per-layer dims, counted as transformers does (tied once).

    Embeddings, lm_head (unless tied), final norm, and per layer: q/k/v/o, gate/up/down,
    their biases (Qwen2 q/k/v; attention_bias / mlp_bias), two norms, and per-head norms.
    """
    h, hd = arch.hidden_size, arch.head_dim
    total = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) + h
    for d in layers:
        q, kv, inter = d.heads[1] * hd, d.kv_heads[1] * hd, d.intermediate[1]
        rows = {"q": q, "k": kv, "v": kv, "o": h, "gate": inter, "up": inter, "down": h}
        total += 2 * h * q + 2 * h * kv + 3 * h * inter + 2 * h
        total += sum(rows[r] for r in arch.bias_roles)
        total += len(arch.family.head_norms) * hd
    return total
