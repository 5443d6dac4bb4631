"""How sparse (non-structured) weights are laid out in a bundle (specs/bundle-v1.md 7.3).

Format knowledge only: names, dtypes and shapes of a sparse Linear's stored tensors, packing
and unpacking of its bitmask, and the layout checks a validator and a reader share. The
pruner, the loader, alignment and ``validate`` all read it from here.

A sparse Linear ``W`` with logical weight ``[out, in]`` whose kept positions are the boolean
``mask [out, in]`` (``nnz`` of them) is stored as::

    W.weight.mask     U8       [out, ceil(in / 8)]  row r, byte j, bit k (value 1 << k) = mask[r, 8j + k]
    W.weight.values   <dtype>  [nnz]                the kept weights in row-major order

Bits beyond ``in`` in a row's last byte are 0. No offsets are stored: row r's values start at
the number of set bits in rows 0..r-1, which a reader derives in one pass; storing them would
add a second copy of the same fact that could disagree. A kept weight may be exactly zero
(the mask, not the value, says what was pruned).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import LoramError

FEATURE = "sparse"  # the `requires` entry of a bundle holding sparse weights
STRATEGIES = ("unstructured", "semi-structured")  # pruning.strategy values that store sparse weights
SPARSE_IMPORTANCES = ("magnitude", "wanda", "sparsegpt")
MASK = "mask"
VALUES = "values"
_BITS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)  # bit k of a byte = column 8j + k
_UNPACKED = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)).bitwise_and(1).bool()  # byte -> bits, LSB first
_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)
# Weights per piece of mask :func:`expand` unpacks: 16 MiB of bools (CPU masked_scatter_ costs ~6x more per weight in 256 Ki pieces).
_EXPAND_PIECE = 1 << 24
_PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


def mask_key(module: str) -> str:
    return f"{module}.weight.{MASK}"


def values_key(module: str) -> str:
    return f"{module}.weight.{VALUES}"


def module_of(key: str) -> str | None:
    """``W`` for ``W.weight.mask`` / ``W.weight.values``, else None."""
    for suffix in (f".weight.{MASK}", f".weight.{VALUES}"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M): N weights kept in every M consecutive input columns, 0 < N < M."""
    m = _PATTERN.match(str(text).strip())
    if not m or not int(m[1]) < int(m[2]):
        raise LoramError(f"pattern {text!r} is not N:M with 0 < N < M (e.g. 2:4: keep 2 of every 4 weights)")
    return int(m[1]), int(m[2])


def mask_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return shape[0], math.ceil(shape[1] / 8)


def expected_entries(module: str, shape: tuple[int, int], nnz: int, dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (safetensors dtype, shape) of the two tensors of one sparse Linear; ``dtype`` a safetensors code."""
    return {mask_key(module): ("U8", mask_shape(shape)), values_key(module): (dtype, (nnz,))}


def stored_bytes(shape: tuple[int, int], nnz: int, element_size: int) -> int:
    """Bytes one sparse Linear takes on disk (and in memory, loaded compressed)."""
    rows, cols = mask_shape(shape)
    return rows * cols + nnz * element_size


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[out, in]`` -> U8 ``[out, ceil(in / 8)]``, bit k of byte j = column 8j + k."""
    out, cols = mask.shape
    padded = torch.zeros(out, mask_shape((out, cols))[1] * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    bits = padded.view(out, -1, 8) * _BITS.to(mask.device)  # (out, bytes, 8), each bit at its place
    return bits.sum(dim=-1, dtype=torch.uint8)  # distinct bits: the sum is an OR, never overflows


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """U8 ``[out, ceil(cols / 8)]`` -> bool ``[out, cols]`` (the inverse of :func:`pack_mask`).

    A table lookup (byte -> its 8 bools): a loaded sparse model unpacks every mask in each
    forward and backward, and this is 5-10x faster on CPU than masking the bits out.
    """
    bits = _UNPACKED.to(packed.device).index_select(0, packed.reshape(-1).int())  # (out * bytes, 8)
    return bits.view(packed.shape[0], -1)[:, :cols].contiguous()  # a copy only when cols % 8 != 0


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Set bits per row of a packed mask, int64 ``[out]``."""
    return _POPCOUNT.to(packed.device)[packed.long()].sum(dim=-1)


def compress(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed mask, kept values in row-major order) of ``weight [out, in]`` under ``mask [out, in]``."""
    if weight.shape != mask.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ")
    return pack_mask(mask), weight[mask]  # boolean indexing walks row-major


def expand(packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight: kept values at their positions, zeros elsewhere (transient).

    Rows are filled in pieces of at most ``_EXPAND_PIECE`` weights, so beside the result at most
    that much of the bool mask exists (a whole one would add 1 byte a weight to a large
    projection's forward peak, and CUDA's ``masked_scatter`` another 8 for its prefix sums).
    """
    out, cols = shape
    dense = torch.zeros(shape, dtype=dtype or values.dtype, device=values.device)
    source = values.to(dense.dtype)
    rows = max(1, _EXPAND_PIECE // max(1, cols))
    start = 0
    for r0 in range(0, out, rows):
        mask = unpack_mask(packed[r0 : r0 + rows], cols)  # (rows, cols)
        dense[r0 : r0 + rows].masked_scatter_(mask, source[start:])  # set positions in row-major order
        start += int(mask.sum()) if r0 + rows < out else 0
    return dense


def layout_problems(
    module: str, shape: tuple[int, int], packed: torch.Tensor, nnz: int, pattern: tuple[int, int] | None
) -> list[str]:
    """Every way one stored sparse Linear breaks the layout: mask shape, padding bits, the
    number of values, and the N:M constraint (exactly N kept in each group of M columns)."""
    key = mask_key(module)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != mask_shape(shape):
        return [
            f"{key}: {packed.dtype} {list(packed.shape)}, expected uint8 {list(mask_shape(shape))} for a {list(shape)} weight"
        ]
    problems = []
    pad = packed.shape[1] * 8 - shape[1]
    if pad and packed[:, -1].bitwise_and(0xFF ^ ((1 << (8 - pad)) - 1)).any():
        problems.append(f"{key}: bits set beyond column {shape[1]} (padding must be 0)")
    kept = int(popcount(packed).sum())
    if kept != nnz:
        problems.append(f"{values_key(module)}: {nnz} values, the mask keeps {kept}")
    if pattern is not None:
        n, m = pattern
        if shape[1] % m:
            problems.append(f"{key}: {shape[1]} columns are not a multiple of M={m} of the {n}:{m} pattern")
        else:
            per_group = unpack_mask(packed, shape[1]).view(shape[0], shape[1] // m, m).sum(dim=-1)  # (out, in/M)
            bad = (per_group != n).nonzero()
            if len(bad):
                r, g = bad[0].tolist()
                problems.append(
                    f"{key}: row {r}, columns {g * m}..{g * m + m - 1} keep {int(per_group[r, g])}, the {n}:{m} pattern keeps {n}"
                )
    return problems
