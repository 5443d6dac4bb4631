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
    def from_json(cls, d: dict) -> LayerDims:
        pair = lambda k: (int(d[k]["original"]), int(d[k]["kept"]))  # noqa: E731
        return cls(
            int(d["index"]),
            bool(d["pruned"]),
            pair("num_attention_heads"),
            pair("num_key_value_heads"),
            pair("intermediate_size"),
        )


def unit_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Rows covered by whole units of ``width`` rows each: (n,) -> (n * width,), ascending."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def _unit_kinds(arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """kind -> (units, rows or columns per unit) in an unpruned layer."""
    return {
        "query": (arch.num_key_value_heads, arch.group_size * arch.head_dim),
        "kv": (arch.num_key_value_heads, arch.head_dim),
        "channel": (arch.intermediate_size, 1),
    }


def coupled_slices(arch: ArchSpec, layer: int) -> dict[str, list[tuple[int, str, int, int]]]:
    """Tensor name -> its segments ``(dim, kind, start, length)`` coupled to the layer's units.

    A plain projection has one segment covering the whole dimension; a fused one (Phi-3's
    qkv_proj) has one per role, in row order. Biases of row-pruned projections follow
    their rows; o/down biases live in hidden space and belong to no unit.
    """
    sizes = _unit_kinds(arch)
    out: dict[str, list[tuple[int, str, int, int]]] = {}
    for role, dim, kind in ATTENTION_ROLES + MLP_ROLES:
        if arch.family.per_expert(role):
            continue  # a mixture of experts: see expert_tensors
        module = arch.family.module(layer, role)
        names = (f"{module}.weight", f"{module}.bias") if dim == 0 else (f"{module}.weight",)
        for name in names:
            segments = out.setdefault(name, [])
            start = sum(length for _, _, _, length in segments)
            units, width = sizes[kind]
            segments.append((dim, kind, start, units * width))
    return out


def expert_tensors(arch: ArchSpec, layer: int) -> dict[str, tuple[int, int]]:
    """A mixture of experts' per-expert MLP tensors of one layer: name -> (expert, dim of the channels)."""
    out: dict[str, tuple[int, int]] = {}
    for e in range(arch.num_experts):
        for role, dim, _kind in MLP_ROLES:
            module = arch.family.module(layer, role, e)
            out[f"{module}.weight"] = (e, dim)
            if dim == 0:
                out[f"{module}.bias"] = (e, 0)
    return out


def layer_index_maps(
    arch: ArchSpec, layer: int, kept_groups: torch.Tensor, kept_channels: torch.Tensor, tensor_names: set[str]
) -> dict[str, torch.Tensor]:
    """Index maps ``"<tensor>:<dim>" -> kept indices`` for every pruned tensor of one layer.

    ``kept_groups``: kept KV heads (== heads for MHA), ascending. ``kept_channels``: kept MLP
    channels (I_kept,), or (E, I_kept) for a mixture of experts, a row per expert. A KV group g owns
    query heads g*G .. g*G+G-1, which own q rows / o columns head*head_dim .. +head_dim-1.
    Biases of row-pruned projections share the rows' map. A fused projection's map is its
    segments' maps, each shifted by the segment's start. A block that keeps all its units
    (attention at a low ratio) gets no maps: a map always removes something.
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
        "channel": kept_channels.shape[-1] == arch.intermediate_size,
    }
    maps: dict[str, torch.Tensor] = {}
    for name, segments in coupled_slices(arch, layer).items():
        if name not in tensor_names or all(whole[kind] for _, kind, _, _ in segments):
            continue
        dim = segments[0][0]
        maps[f"{name}:{dim}"] = torch.cat([by_kind[kind] + start for _, kind, start, _ in segments])
    if arch.num_experts and kept_channels.shape[-1] < arch.intermediate_size:
        for name, (e, dim) in expert_tensors(arch, layer).items():
            if name in tensor_names:
                maps[f"{name}:{dim}"] = kept_channels[e]
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

    Embeddings, lm_head (unless tied), final norm, and per layer: q/k/v/o, gate/up/down
    (fused or not), their biases (Qwen2 q/k/v; attention_bias / mlp_bias), the family's
    hidden-size norms, and per-head norms.
    """
    h, hd = arch.hidden_size, arch.head_dim
    total = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) + h
    for d in layers:
        q, kv, inter = d.heads[1] * hd, d.kv_heads[1] * hd, d.intermediate[1]
        rows = {"q": q, "k": kv, "v": kv, "o": h, "gate": inter, "up": inter, "down": h}
        experts = max(arch.num_experts, 1)  # a mixture: every expert's MLP, and the router
        total += 2 * h * q + 2 * h * kv + experts * 3 * h * inter + arch.family.layer_norms * h
        total += arch.num_experts * h
        total += sum(rows[r] for r in arch.bias_roles)
        total += len(arch.family.head_norms) * hd
    return total


def linear_shapes(arch: ArchSpec, d: LayerDims) -> list[tuple[int, int]]:
    """[out, in] of each distinct Linear projection of one layer (a fused one once, its rows summed)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv, inter = d.heads[1] * hd, d.kv_heads[1] * hd, d.intermediate[1]
    shape = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    out: dict[str, tuple[int, int]] = {}
    for role, module in arch.family.modules.items():
        if arch.family.per_expert(role):
            continue  # expert MLPs are not Linear modules in memory: see expert_shapes
        rows, cols = shape[role]
        prev = out.get(module)
        out[module] = (rows + prev[0], cols) if prev else (rows, cols)
    return list(out.values())


def expert_shapes(arch: ArchSpec, d: LayerDims) -> list[tuple[int, int]]:
    """[out, in] of every expert's gate, up and down projection in one layer (none for a dense MLP)."""
    h, inter = arch.hidden_size, d.intermediate[1]
    return [(inter, h), (inter, h), (h, inter)] * arch.num_experts


def expert_source(arch: ArchSpec, name: str) -> tuple[str, int, str] | None:
    """Where a stored expert weight lives in transformers' fused expert tensors, or None.

    ``...mlp.experts.3.gate_proj.weight`` -> (``...mlp.experts.gate_up_proj``, 3, "gate"):
    on disk each expert has gate_proj / up_proj [I, H] and down_proj [H, I]; in memory
    ``gate_up_proj[e]`` is [gate | up] rows ([2I, H]) and ``down_proj[e]`` the down weight.
    """
    family = arch.family
    module, _, leaf = name.rpartition(".")
    role = family.role_of(module) if family.experts and leaf == "weight" else None
    if role is None or not family.per_expert(role):
        return None
    layer = family.layer_of(module)
    prefix = f"{family.layers_prefix}.{layer}.{family.experts}"
    expert = int(module[len(prefix) + 1 :].split(".", 1)[0])
    return f"{prefix}.{'down_proj' if role == 'down' else 'gate_up_proj'}", expert, role


def expert_part(fused: torch.Tensor, expert: int, role: str) -> torch.Tensor:
    """The view of a fused expert tensor that holds one expert's ``role`` weight (see :func:`expert_source`)."""
    if role == "down":
        return fused[expert]  # [H, I]
    k = fused.shape[1] // 2  # gate_up_proj[e]: [gate | up] rows
    return fused[expert, :k] if role == "gate" else fused[expert, k:]


def expert_members(arch: ArchSpec, fused_name: str) -> list[tuple[str, int, str]]:
    """The stored weights a fused expert tensor is made of: ``[(stored name, expert, role)]`` (empty if none)."""
    family = arch.family
    layer = family.layer_of(fused_name.rsplit(".", 1)[0])
    if not family.experts or layer is None:
        return []
    prefix = f"{family.layers_prefix}.{layer}.{family.experts}."
    roles = (
        {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}.get(fused_name.removeprefix(prefix))
        if fused_name.startswith(prefix)
        else None
    )
    return [(f"{family.module(layer, r, e)}.weight", e, r) for e in range(arch.num_experts) for r in roles or ()]


def expert_channel_sums(arch: ArchSpec, fused: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per expert channel, the sum of a per-element score over its gate row, up row and down column: (E, I).

    ``fused``: ``"gate_up_proj"`` [E, 2I, H] and/or ``"down_proj"`` [E, H, I] scores (transformers' layout).
    """
    out = torch.zeros(arch.num_experts, arch.intermediate_size, dtype=torch.float64)
    if "gate_up_proj" in fused:
        s = fused["gate_up_proj"].sum(dim=2, dtype=torch.float64)  # (E, 2I): [gate | up]
        out += s[:, : arch.intermediate_size] + s[:, arch.intermediate_size :]
    if "down_proj" in fused:
        out += fused["down_proj"].sum(dim=1, dtype=torch.float64)  # (E, I)
    return out
