"""Tolerances derived from the magnitudes compared, never tuned to one CPU.

Two computations of the same math in floating point differ by re-association (summation
order, blocking, threads, SIMD width): each result's error is a small multiple of the
unit roundoff at the size of the values summed. So a tolerance is a number of ``eps`` of
the dtype the computation ran in, at the largest magnitude compared; where the math is
exact the comparison runs in float64, whose ``eps`` leaves room for any machine while an
actual mistake (a wrong scale, a missing module, a wrong index) stays orders larger.
"""

from __future__ import annotations

import torch


def eps_tol(reference: torch.Tensor, ulps: float, dtype: torch.dtype | None = None) -> float:
    """``ulps`` units of roundoff of ``dtype`` (default: the reference's) at ``max|reference|``."""
    dtype = dtype or reference.dtype
    return ulps * torch.finfo(dtype).eps * float(reference.detach().abs().max())


def assert_close_eps(got: torch.Tensor, want: torch.Tensor, ulps: float, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """``|got - want| <= eps_tol(want, ulps, dtype)`` elementwise, with the worst offender in the message."""
    tol = eps_tol(want, ulps, dtype)
    err = (got.detach().to(want.dtype) - want.detach()).abs()
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= tol, (
        f"{msg} max |got - want| = {worst:.3g} > {tol:.3g} ({ulps} eps at max |want| {float(want.abs().max()):.3g})"
    )
