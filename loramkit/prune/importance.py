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

Blockwise = Callable[[torch.Tensor], torch.Tensor]
_BLOCK_ELEMENTS = 1 << 16  # per block of units: cache-sized temporaries


def unit_sums(t: torch.Tensor, dim: int, units: int, per_block: Blockwise | None = None) -> torch.Tensor:
    """Sum a per-element score over each of ``units`` equal slices of dimension ``dim``: -> (units,).

    ``per_block`` (e.g. ``w -> w.float().square()``) turns raw weights into scores a few units
    at a time, so temporaries stay cache-sized instead of several copies of the tensor. Each
    unit is still one reduction of the same elements in the same order, run on one thread as
    torch runs each output of a many-output reduction (blocks hold at least two units), so the
    sums are the same bits.
    """
    if per_block is None:
        return t.movedim(dim, 0).reshape(units, -1).sum(dim=1, dtype=torch.float64)
    if units < 2:  # one sum: torch splits it across its threads, so blocks would change its bits
        return unit_sums(per_block(t), dim, units)
    width = t.shape[dim] // units
    step = max(2, _BLOCK_ELEMENTS // max(t.numel() // max(units, 1), 1))
    out = torch.empty(units, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # cache-sized blocks: waking OpenMP threads for each costs more than it saves
    try:
        start = 0
        while start < units:
            n = units - start if units - start < 2 * step else step  # no one-unit tail
            block = per_block(t.narrow(dim, start * width, n * width))
            out[start : start + n] = block.movedim(dim, 0).reshape(n, -1).sum(dim=1, dtype=torch.float64)
            start += n
    finally:
        torch.set_num_threads(threads)
    return out


def group_scores(
    arch: ArchSpec, layer: int, elementwise: Callable[[str], torch.Tensor | None], per_block: Blockwise | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``elementwise(tensor_name)`` over each KV group and each MLP channel of one layer.

    ``elementwise`` returns the per-element score of a tensor (w**2, |w * g|), or None when
    the tensor does not exist (no bias); with ``per_block`` (see :func:`unit_sums`) it may return
    the raw weight instead. Returns (kv_group_scores (H_kv,), channel_scores (I,)).
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
            acc += unit_sums(score.narrow(d, start, length), d, acc.numel(), per_block)
    return kv, ch


def expert_channel_scores(
    arch: ArchSpec, layer: int, elementwise: Callable[[str], torch.Tensor | None], per_block: Blockwise | None = None
) -> torch.Tensor:
    """A mixture of experts: sum ``elementwise`` over each expert's channels (gate row, up row, down column): (E, I)."""
    out = torch.zeros(arch.num_experts, arch.intermediate_size, dtype=torch.float64)
    for name, (e, d) in expert_tensors(arch, layer).items():
        score = elementwise(name)
        if score is not None:
            out[e] += unit_sums(score, d, arch.intermediate_size, per_block)
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
