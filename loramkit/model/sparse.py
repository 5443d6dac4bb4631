"""Compressed (non-structured sparse) Linear modules: a bundle's mask + kept values, trained as they are.

A sparse bundle (spec 7.3) stores each pruned projection as a packed bitmask and its kept
values. :class:`SparseLinear` holds exactly those two tensors in memory, never a dense
weight at rest: its forward expands the weight for the one matmul and drops it, and its
backward expands it again (:class:`_SparseLinearFunction`), so what a layer keeps between
calls is ``nnz`` values plus one bit per weight. Pruned weights are not stored anywhere, so
they are zero by construction, and training the values (``loramkit align``) keeps the pattern.

It is an ``nn.Linear`` (``in_features`` / ``out_features``, a ``weight`` with ``shape``,
``dtype`` and ``device``), so ``peft.get_peft_model`` wraps it with its ordinary LoRA
``Linear`` and the adapter's keys are those of a dense model. ``weight`` is a small module
(:class:`SparseWeight`) whose state is ``weight.mask`` and ``weight.values``: the model's
``state_dict`` keys are the bundle's stored tensor names.

For comparisons with the paper's way (the same zeros in a dense weight), :func:`densify`
turns every compressed Linear of a model into a zero-filled ``nn.Linear`` in place, and
``load_pruned_model(..., sparse="dense")`` loads a sparse bundle that way.

Cost: every forward and backward unpacks the mask and scatters the values (one pass over the
weight's elements; ``masked_scatter`` is a serial loop on CPU, parallel on CUDA). With
thousands of tokens per step that is small beside the matmul; for many tiny forwards, such as
``generate()`` one token at a time on a CPU, ``densify(model)`` first trades the memory back
for speed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..bundle import Bundle
from ..bundle.model_dir import Checkpoint
from ..bundle.sparse import expand, expected_entries, layout_problems, mask_key, parse_pattern, unpack_mask, values_key
from ..errors import BundleError, LoramError

__all__ = ["SparseLinear", "SparseWeight", "densify", "load_sparse_linears"]

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (never float64)


class SparseWeight(nn.Module):
    """The compressed weight of one :class:`SparseLinear`: ``values`` (a parameter) and ``mask`` (a buffer).

    Reads like the dense weight it stands for where code only asks about it (``shape``,
    ``dtype``, ``device``, ``requires_grad``); any arithmetic on it fails loudly, since it is
    not a tensor (e.g. PEFT's ``merge``, which would need the dense weight).

    Args:
        packed: U8 ``[out, ceil(in / 8)]``, bit k of byte j = column 8j + k (spec 7.3).
        values: the kept weights in row-major order, ``[nnz]``.
        shape: the logical ``(out, in)``.
    """

    def __init__(self, packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], requires_grad: bool = False):
        super().__init__()
        self.shape = torch.Size(shape)
        self.values = nn.Parameter(values, requires_grad=requires_grad)
        self.register_buffer("mask", packed)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def requires_grad(self) -> bool:
        return self.values.requires_grad

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def data(self) -> torch.Tensor:
        """Refused: code reaching for the dense tensor (PEFT's merge) gets one clear line, not a wrong shape."""
        raise LoramError(
            "a compressed sparse weight has no dense tensor to change in place: merge adapters into the original "
            "base (loramkit recover --merge), or densify(model) first (loramkit.model.sparse)"
        )

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight (kept values, zeros elsewhere): a new tensor, not kept."""
        return expand(self.mask, self.values.detach(), tuple(self.shape), dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nnz={self.nnz}, density={self.nnz / max(1, self.shape.numel()):.3f}"


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a dense Linear in for ``x``, or None outside autocast."""
    kind = x.device.type
    if x.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class _SparseLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` expanded from (mask, values) in forward and again in backward.

    Autograd never holds ``W``: forward saves ``x`` only when the values need a gradient
    (that gradient is ``(grad_out^T @ x)`` at the kept positions), plus the stored tensors
    themselves. Under autocast it does the casts autocast does to a dense Linear (input,
    weight and bias to the autocast dtype) and repeats them in backward, so its gradients
    are a dense zero-filled Linear's.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, values: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                x_c = x.to(dtype)
                out = F.linear(x_c, expand(packed, values, shape, dtype), None if bias is None else bias.to(dtype))
        else:  # no casts: dtypes must agree, as for nn.Linear
            x_c = x
            out = F.linear(x, expand(packed, values, shape), bias)
        ctx.shape, ctx.dtype, ctx.x_dtype = shape, dtype or values.dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x_c if ctx.needs_input_grad[1] else None, values, packed)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_c, values, packed = ctx.saved_tensors
        need_x, need_values, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_values = grad_bias = None
        grad = grad.to(ctx.dtype)
        # The bool mask (out, in) lives through the matmul only when the values' gradient needs it too (align);
        # under LoRA the one transient beside grad_x is the expanded weight.
        mask = unpack_mask(packed, ctx.shape[1]) if need_values else None
        if need_x:
            if mask is None:
                weight = expand(packed, values, ctx.shape, ctx.dtype)
            else:
                weight = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device).masked_scatter_(mask, values.to(ctx.dtype))
            grad_x = (grad @ weight).to(ctx.x_dtype)  # (..., out) @ (out, in)
            del weight
        if need_values:  # the dense weight gradient, kept only where the mask keeps a weight
            dense = grad.reshape(-1, ctx.shape[0]).T @ x_c.reshape(-1, ctx.shape[1])  # (out, N) @ (N, in)
            grad_values = dense.masked_select(mask).to(values.dtype)
        if need_bias:
            grad_bias = grad.reshape(-1, ctx.shape[0]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_values, None, grad_bias, None


class SparseLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored compressed (:class:`SparseWeight`); bias dense.

    ``weight.values`` does not train unless asked (``requires_grad_``); the mask never does.

    Example:
        >>> layer = SparseLinear.from_dense(torch.randn(8, 16), torch.rand(8, 16) > 0.5)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], bias: nn.Parameter | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the dense weight
        self.out_features, self.in_features = shape
        self.weight = SparseWeight(packed, values, shape)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
        """The compressed Linear of ``weight [out, in]`` keeping ``mask [out, in]`` (for tests and conversions)."""
        from ..bundle.sparse import compress

        packed, values = compress(weight.detach(), mask)
        return cls(packed, values.clone(), tuple(weight.shape), None if bias is None else nn.Parameter(bias.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return _SparseLinearFunction.apply(x, w.values, w.mask, self.bias, tuple(w.shape))

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight, zeros at pruned positions: a new tensor each call."""
        return self.weight.dense(dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the zero-filled dense weight (the paper's way of training sparse models).

        The bias parameter is shared, not copied.
        """
        w = self.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=False, device="meta", dtype=w.dtype)
        dense.weight = nn.Parameter(self.dense_weight(), requires_grad=w.requires_grad)
        dense.bias = self.bias
        return dense

    def reset_parameters(self) -> None:
        """Nothing: the weight is a pruned bundle's, never re-initialised (nn.Linear's would need a dense one)."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, sparse"


def densify(model: nn.Module) -> int:
    """Replace every :class:`SparseLinear` of ``model`` (in place) by its zero-filled dense ``nn.Linear``.

    The same model as the paper trains its non-structured variants ("pruned weights are filled
    with zeros in actual training"): same outputs, a dense weight's memory. Returns how many
    modules were replaced.
    """
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, SparseLinear)]
    for path, module in found:
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module.to_linear())
    return len(found)


def load_sparse_linears(
    model: nn.Module,
    b: Bundle,
    ckpt: Checkpoint,
    shapes: dict[str, tuple[int, ...]],
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    dense: bool = False,
) -> set[str]:
    """Replace each module ``sparsity.modules`` lists by a :class:`SparseLinear` holding its stored mask and values.

    Each module's stored entries are checked against the manifest before they are read
    (names, dtypes, shapes: :func:`~loramkit.bundle.sparse.expected_entries`) and its mask
    against the layout (padding, count, N:M pattern). A bias stays the model's (meta)
    parameter, filled like any dense tensor by the caller.

    Args:
        shapes: the logical shape of every tensor (from the manifest).
        dtype: what the values are loaded as (the model's dtype).
        dense: build zero-filled ``nn.Linear`` modules instead (see :func:`densify`).

    Returns:
        The stored tensor names consumed (masks and values).
    """
    sparsity = b.manifest["sparsity"]
    pattern = parse_pattern(sparsity["pattern"]) if sparsity.get("pattern") else None
    family = b.arch.family
    stored = set(ckpt.names())
    done: set[str] = set()
    for module in sparsity["modules"]:
        weight_name = f"{module}.weight"
        shape = shapes.get(weight_name)
        try:
            old = model.get_submodule(module)
        except AttributeError:
            old = None
        if family.role_of(module) is None or shape is None or not isinstance(old, nn.Linear):
            raise BundleError(f"{b.path}: sparsity lists {module}, which is not a decoder-layer projection of the model")
        if (old.out_features, old.in_features) != tuple(shape):
            raise BundleError(f"{b.path}: sparse module {module} is {list(shape)} in the manifest, the model's is "
                              f"{[old.out_features, old.in_features]}")  # fmt: skip
        values_name = values_key(module)
        info = ckpt.info(values_name) if values_name in stored else None
        nnz = info.shape[0] if info is not None and len(info.shape) == 1 else 0
        for key, (dt, shp) in expected_entries(module, tuple(shape), nnz, b.base["tensors"][weight_name]["dtype"]).items():
            got = ckpt.info(key) if key in stored else None
            if got is None or (got.dtype, got.shape) != (dt, shp):
                what = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
                raise BundleError(f"{b.path}: {key} is {what}, the manifest implies {dt}{list(shp)}; re-create the bundle")
        packed = ckpt.get(mask_key(module))
        problems = layout_problems(module, tuple(shape), packed, nnz, pattern)
        if problems:
            raise BundleError(f"{b.path}: {problems[0]}; re-create the bundle")
        values = ckpt.get(values_name).to(device=device, dtype=dtype)
        new: nn.Module = SparseLinear(packed.to(device), values, tuple(shape), old.bias)
        if dense:
            new = new.to_linear()
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        done |= {mask_key(module), values_name}
    return done
