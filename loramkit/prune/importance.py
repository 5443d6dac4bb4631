"""Importance of pruning units: which KV groups and MLP channels a layer keeps.

Scores are reduced over every weight of a coupled group (LLM-Pruner style): a KV group
is its q rows, k rows, v rows (and their biases) and o columns; a channel is its gate
row, up row and down column.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..families import ArchSpec
from ..families.geometry import coupled_slices, expert_tensors


def unit_sums(t: torch.Tensor, dim: int, units: int) -> torch.Tensor:
    """Sum a per-element score over each of ``units`` equal slices of dimension ``dim``: -> (units,)."""
    return t.movedim(dim, 0).reshape(units, -1).sum(dim=1, dtype=torch.float64)


def group_scores(
    arch: ArchSpec, layer: int, elementwise: Callable[[str], torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``elementwise(tensor_name)`` over each KV group and each MLP channel of one layer.

    ``elementwise`` returns the per-element score of a tensor (w**2, |w * g|), or None when
    the tensor does not exist (no bias). Returns (kv_group_scores (H_kv,), channel_scores (I,)).
    """
    kv = torch.zeros(arch.num_key_value_heads, dtype=torch.float64)
    ch = torch.zeros(arch.intermediate_size, dtype=torch.float64)
    acc_of = {"query": kv, "kv": kv, "channel": ch}
    for name, segments in coupled_slices(arch, layer).items():
        score = elementwise(name)
        if score is None:
            continue
        for d, kind, start, length in segments:  # a fused projection: each role's rows apart
            acc = acc_of[kind]
            acc += unit_sums(score.narrow(d, start, length), d, acc.numel())
    return kv, ch


def expert_channel_scores(arch: ArchSpec, layer: int, elementwise: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """A mixture of experts: sum ``elementwise`` over each expert's channels (gate row, up row, down column): (E, I)."""
    out = torch.zeros(arch.num_experts, arch.intermediate_size, dtype=torch.float64)
    for name, (e, d) in expert_tensors(arch, layer).items():
        score = elementwise(name)
        if score is not None:
            out[e] += unit_sums(score, d, arch.intermediate_size)
    return out


def top_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


def random_units(total: int, k: int, seed: int, layer: int, salt: int) -> torch.Tensor:
    """``k`` of ``total`` units drawn with a generator seeded per (seed, layer, block)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 2 + salt)
    return torch.randperm(total, generator=g)[:k].sort().values


def random_expert_units(experts: int, total: int, k: int, seed: int, layer: int) -> torch.Tensor:
    """``k`` of ``total`` channels per expert, each expert its own draw: (E, k), rows ascending."""
    rows = []
    for e in range(experts):  # one generator per (seed, layer, expert), apart from random_units' seeds
        g = torch.Generator().manual_seed(((seed * 1_000_003 + layer) * 1_000_033 + e) * 2 + 1)
        rows.append(torch.randperm(total, generator=g)[:k].sort().values)
    return torch.stack(rows)
