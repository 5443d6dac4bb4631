"""Non-structured pruning math: which weights of one ``[out, in]`` matrix are kept, and (SparseGPT) their new values.

Pure functions of one weight matrix and, for the calibrated methods, one statistic of its
input (the sum over calibration tokens of ``x_j^2`` for Wanda, of ``x x^T`` for SparseGPT).
They know nothing of files, layers or models: the calibration engine gathers the statistics
layer by layer and the sparse writer stores the results.

Every method removes an exact count (``pruning.rounding: "floor"``): a comparison group of
``size`` weights removes ``floor(size * ratio)`` of them, the lowest-scoring, and among equal
scores the lower (row-major) index first. The group is the whole matrix for magnitude, one
output row for Wanda, one row-by-128-column block for SparseGPT; with an N:M pattern each run
of M consecutive input columns of a row keeps its N best. So the number of kept weights of a
module is known before any score is computed (:func:`kept_count`), and a bundle's tensor
shapes can be planned up front.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from ..errors import LoramError
from ..families.pruning_rules import SPARSE_BLOCK, removed
from ..families.pruning_rules import sparse_kept_count as kept_count  # the one copy of the rule

SPARSEGPT_BLOCKSIZE = SPARSE_BLOCK  # columns per block: the mask of a block is chosen before its updates
SPARSEGPT_DAMPENING = Fraction(1, 100)  # of the mean of the Hessian's diagonal, added to the diagonal
_SMALL_BLOCK = 1 << 18  # elements of a block below which its column steps run on one thread

DEFINITIONS = {  # recorded in the manifest as pruning.importance_definition
    "magnitude": (
        "magnitude: score |W_ij|; each sparsified projection removes floor(out * in * ratio) weights of lowest score "
        "over the whole matrix (N:M: in each group of M consecutive input columns of a row, the M - N lowest); "
        "ties: the lower row-major index is removed first; kept values are the base's"
    ),
    "wanda": (
        "Wanda: score |W_ij| * ||X_j||_2, X_j the projection's input feature j over every calibration token "
        "(inputs of the already-pruned layers before it); each output row removes floor(in * ratio) weights of "
        "lowest score (N:M: in each group of M consecutive input columns of a row, the M - N lowest); ties: the "
        "lower index is removed first; no weight update, kept values are the base's"
    ),
    "sparsegpt": (
        "SparseGPT (IST-DASLab fasterprune): H = 2/n * sum X^T X in fp32 over the n calibration tokens of the "
        "projection's input (inputs of the already-pruned layers before it), dead inputs (H_jj = 0) set H_jj = 1 "
        "and W[:, j] = 0, dampening 0.01 * mean(diag H) added to the diagonal, U = upper Cholesky factor of H^-1; "
        "column blocks of 128 (N:M: the largest multiple of M not above 128); unstructured: each block removes "
        "floor(out * cols * ratio) weights of lowest W_ij^2 / U_jj^2 (ties: lower row-major index first), N:M: "
        "every M columns of a row remove the M - N lowest of that score on the updated weights; optimal brain "
        "surgeon updates of the remaining weights column by column (in-block, then lazily to later blocks), "
        "all in fp32, the result rounded to the base dtype"
    ),
}


def sparsegpt_blocksize(pattern: tuple[int, int] | None) -> int:
    """128 columns, or for N:M the largest multiple of M not above 128 (groups never straddle blocks)."""
    if pattern is None:
        return SPARSEGPT_BLOCKSIZE
    m = pattern[1]
    return max(m, SPARSEGPT_BLOCKSIZE // m * m)


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool ``(G, S)``: the ``k`` lowest scores of each row; among equal scores the lower index first.

    A threshold (the k-th smallest) and a count of ties instead of a full argsort: a whole
    projection is one group for magnitude, and a sort's int64 indices would be 4x its bytes.
    """
    groups, size = scores.shape
    if k <= 0:
        return torch.zeros(groups, size, dtype=torch.bool, device=scores.device)
    if k >= size:
        return torch.ones(groups, size, dtype=torch.bool, device=scores.device)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values  # (G, 1)
    out = scores < threshold
    ties = scores == threshold
    need = k - out.sum(dim=1, keepdim=True)  # ties to take in each row, >= 1
    if groups == 1:  # one large group: positions of its ties, not a cumulative count over all of it
        at = ties[0].nonzero().squeeze(1)[: int(need)]
        out[0, at] = True
    else:
        out |= ties & (ties.cumsum(dim=1) <= need)
    return out


def lowest_per_group(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool ``(R, C)``, C a multiple of ``m``: in each run of ``m`` columns of a row, the ``m - n`` lowest."""
    rows, cols = scores.shape
    groups = scores.reshape(rows * (cols // m), m)  # (R * C/m, m): one N:M group a row
    return lowest(groups, m - n).view(rows, cols)


def _check_shape(weight: torch.Tensor, pattern: tuple[int, int] | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"a projection weight is [out, in], got {list(weight.shape)}")
    if pattern is not None and weight.shape[1] % pattern[1]:
        raise ValueError(f"{weight.shape[1]} columns are not a multiple of M={pattern[1]}")


def magnitude_mask(weight: torch.Tensor, ratio: Fraction, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Kept positions (bool ``[out, in]``) by |W|: over the whole matrix, or N:M per row."""
    _check_shape(weight, pattern)
    score = weight.float().abs()  # exact in float32 for every 16/32-bit base
    if pattern is not None:
        return ~lowest_per_group(score, *pattern)
    return ~lowest(score.view(1, -1), removed(weight.numel(), ratio)).view(weight.shape)


def wanda_mask(
    weight: torch.Tensor, input_sq_sum: torch.Tensor, ratio: Fraction, pattern: tuple[int, int] | None = None
) -> torch.Tensor:
    """Kept positions by |W_ij| * ||X_j||_2, compared within each output row (or N:M per row).

    ``input_sq_sum``: ``(in,)``, the sum over calibration tokens of each input feature squared.
    """
    _check_shape(weight, pattern)
    score = weight.float().abs() * input_sq_sum.float().sqrt()  # (out, in) * (in,): broadcast over rows
    if pattern is not None:
        return ~lowest_per_group(score, *pattern)
    return ~lowest(score, removed(weight.shape[1], ratio))


def hessian(gram_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """SparseGPT's H = 2/n * sum X^T X from the summed Gram matrix over ``tokens`` input rows."""
    return gram_sum * (2.0 / max(tokens, 1))


def sparsegpt(
    weight: torch.Tensor,
    h: torch.Tensor,
    ratio: Fraction,
    pattern: tuple[int, int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    what: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[out, in]`` weight given its input Hessian ``h`` ``[in, in]``.

    Returns (kept positions bool ``[out, in]``, the pruned and updated weight in ``weight``'s
    dtype, zeros at the removed positions). The math runs in ``dtype`` (fp32 as the reference;
    float64 for exact tests). ``what`` names the module in errors.
    """
    _check_shape(weight, pattern)
    rows, cols = weight.shape
    W = weight.to(dtype).clone()  # (out, in), updated in place column block by column block
    H = h.to(dtype).clone()  # (in, in)
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(cols, device=H.device)
    H[diag, diag] += float(SPARSEGPT_DAMPENING) * torch.mean(torch.diag(H))
    try:  # each step replaces the last: at most two [in, in] matrices alive besides ``h``
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)  # H^-1
        U = torch.linalg.cholesky(H, upper=True)  # its upper factor: row j holds column j's OBS update
    except torch.linalg.LinAlgError:
        raise LoramError(
            f"{what}: its input Hessian is not positive definite even after dampening; use more calibration text"
        ) from None
    del H
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    bs = sparsegpt_blocksize(pattern)
    for b0 in range(0, cols, bs):
        b1 = min(b0 + bs, cols)
        count = b1 - b0
        W1 = W[:, b0:b1].clone()  # (out, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        d = torch.diag(U1)  # (count,)
        if pattern is None:
            score = W1.square() / d.square()  # OBS saliency of removing each weight of the block
            pruned1 = lowest(score.reshape(1, -1), removed(rows * count, ratio)).view(rows, count)
        else:
            pruned1 = torch.zeros(rows, count, dtype=torch.bool, device=W.device)
        threads = torch.get_num_threads()
        if W1.device.type == "cpu" and W1.numel() < _SMALL_BLOCK:
            torch.set_num_threads(1)  # cache-sized column steps: waking OpenMP threads for each costs more than it saves
        try:
            for j in range(count):
                if pattern is not None and j % pattern[1] == 0:
                    m = pattern[1]
                    score = W1[:, j : j + m].square() / d[j : j + m].square()  # on the weights updated so far
                    pruned1[:, j : j + m] = lowest_per_group(score, *pattern)
                w = W1[:, j]
                q = w.clone()
                q[pruned1[:, j]] = 0
                Q1[:, j] = q
                err = (w - q) / d[j]  # (out,)
                W1[:, j:] -= err.unsqueeze(1) @ U1[j, j:].unsqueeze(0)  # (out, 1) @ (1, count - j)
                Err1[:, j] = err
        finally:
            torch.set_num_threads(threads)
        W[:, b0:b1] = Q1
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]  # the block's errors reach the later columns at once
        keep[:, b0:b1] = ~pruned1
    return keep, W.to(weight.dtype).masked_fill_(~keep, 0)


__all__ = [
    "DEFINITIONS",
    "SPARSEGPT_BLOCKSIZE",
    "SPARSEGPT_DAMPENING",
    "hessian",
    "kept_count",
    "lowest",
    "lowest_per_group",
    "magnitude_mask",
    "removed",
    "sparsegpt",
    "sparsegpt_blocksize",
    "wanda_mask",
]
