"""The pruning rules a bundle records: which layers are pruned, how many units each keeps
(the paper's counting rule, ``pruning.rounding``), and the known importance kinds.

They sit below bundle/ because the format is defined by them: ``loramkit validate``
re-derives every layer's kept counts from the recorded ratio, and prune/ applies the same
rule when it writes a bundle. Pure arithmetic over config sizes; knows nothing of files.
"""

from __future__ import annotations

import math
from fractions import Fraction

from ..errors import LoramError
from .base import ArchSpec
from .geometry import LayerDims

DEFAULT_KEEP_FIRST = 4
DEFAULT_KEEP_LAST = 2
ROUNDING_RULES = ("paper",)
# Values of pruning.importance this loramkit writes; others are provenance it cannot re-check.
IMPORTANCE_KINDS = ("random", "magnitude", "taylor", "activation")


SPARSE_BLOCK = 128  # SparseGPT's column block: its unstructured comparison group (all rows x 128 columns)


def removed(size: int, ratio: Fraction) -> int:
    """Weights a comparison group of ``size`` removes: ``floor(size * ratio)``, in exact arithmetic."""
    return math.floor(size * ratio)


def sparse_kept_count(importance: str, shape: tuple[int, int], ratio: Fraction, pattern: tuple[int, int] | None) -> int:
    """Weights one sparsified ``[out, in]`` projection keeps (``pruning.rounding`` ``"floor"``).

    N:M keeps N of every M input columns of every row. Otherwise each comparison group of
    ``size`` weights drops ``floor(size * ratio)``: the whole matrix for magnitude, one row for
    Wanda, each 128-column block over all rows (the last may be narrower) for SparseGPT. The
    pruner, the planner and the validator all count with this one rule.
    """
    out, cols = shape
    if pattern is not None:
        n, m = pattern
        return out * (cols // m) * n
    if importance == "magnitude":
        groups = [(1, out * cols)]  # (how many, size)
    elif importance == "wanda":
        groups = [(out, cols)]
    elif importance == "sparsegpt":
        full, rest = divmod(cols, SPARSE_BLOCK)
        groups = [(full, out * SPARSE_BLOCK)] + ([(1, out * rest)] if rest else [])
    else:
        raise LoramError(f"importance {importance!r} is not one of magnitude, wanda, sparsegpt")
    return sum(count * (size - removed(size, ratio)) for count, size in groups)


def exact_ratio(ratio: float | str) -> Fraction:
    """The ratio as the exact decimal the user wrote: 0.85 is 17/20, not 0.84999999999999997."""
    try:
        r = Fraction(repr(ratio) if isinstance(ratio, float) else str(ratio))
    except (ValueError, TypeError, ZeroDivisionError):  # 'inf', 'nan', 'abc', '1/0'
        raise LoramError(f"ratio must be a number in [0, 1), got {ratio!r}") from None
    if not 0 <= r < 1:
        raise LoramError(f"ratio must be in [0, 1), got {ratio}")
    return r


def layers_kept_intact(num_layers: int, keep_first: int | None, keep_last: int | None) -> tuple[int, int]:
    """Layers left unpruned at each end. Defaults are the paper's 4 and 2, fewer for shallow models.

    With defaults: keep_first = min(4, L // 4) and keep_last = min(2, L // 6), so an
    8-layer model keeps 2 and 1 and a model of 16 layers or more keeps 4 and 2.
    """
    first = min(DEFAULT_KEEP_FIRST, num_layers // 4) if keep_first is None else keep_first
    last = min(DEFAULT_KEEP_LAST, num_layers // 6) if keep_last is None else keep_last
    if first < 0 or last < 0 or first + last > num_layers:
        raise LoramError(f"--keep-first {first} and --keep-last {last} do not fit a model of {num_layers} layers")
    return first, last


def kept_units(total: int, ratio: Fraction, kind: str) -> int:
    """Units kept out of ``total`` at ``ratio`` by the paper's rule; at least one is always kept.

    ``kv_groups`` (GQA): ``H_kv - floor(H_kv * r)``; ``heads`` (MHA): ``floor(H * (1 - r))``;
    ``channels`` (MLP): ``I - ceil(I * r)``. Exact arithmetic, so 0.85 never rounds the other way.
    """
    if kind == "kv_groups":
        kept = total - math.floor(total * ratio)
    elif kind == "heads":
        kept = math.floor(total * (1 - ratio))
    elif kind == "channels":
        kept = total - math.ceil(total * ratio)
    else:
        raise ValueError(kind)
    return max(1, kept)


def plan_layers(
    arch: ArchSpec, ratio: float | str, keep_first: int | None = None, keep_last: int | None = None
) -> tuple[list[LayerDims], tuple[int, int]]:
    """Per-layer original and kept dims, and the (keep_first, keep_last) actually used."""
    r = exact_ratio(ratio)
    first, last = layers_kept_intact(arch.num_hidden_layers, keep_first, keep_last)
    H, Hkv, I = arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size
    G = arch.group_size
    layers = []
    for i in range(arch.num_hidden_layers):
        if r > 0 and first <= i < arch.num_hidden_layers - last:
            kv = kept_units(Hkv, r, "kv_groups" if arch.is_gqa else "heads")
            inter = kept_units(I, r, "channels")
        else:
            kv, inter = Hkv, I
        pruned = kv < Hkv or inter < I  # spec 3.3: pruned iff something is removed
        layers.append(LayerDims(i, pruned, (H, kv * G), (Hkv, kv), (I, inter)))
    return layers, (first, last)
