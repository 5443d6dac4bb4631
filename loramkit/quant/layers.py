"""bitsandbytes 4-bit Linear modules from a bundle's stored state, and the CPU workarounds.

A quantized Linear is rebuilt from its serialized tensors with
``Params4bit.from_prequantized``: the packed codes and block constants go straight into
the module, and no dequantized or full-precision weight is ever made (bitsandbytes itself
dequantizes one layer at a time inside its matmul, as it does on every device).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._bnb import bnb

_bnb = bnb()
Linear4bit = _bnb.nn.Linear4bit
Params4bit = _bnb.nn.Params4bit
QuantState = _bnb.functional.QuantState


def build_linear4bit(
    in_features: int,
    out_features: int,
    packed: torch.Tensor,
    state: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` holding stored 4-bit state.

    Args:
        packed: the ``W.weight`` tensor, ``uint8 (ceil(out * in / 2), 1)``.
        state: the module's other serialized tensors keyed without the ``W.weight.`` prefix
            (``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``,
            ``quant_state.bitsandbytes__nf4``), exactly as bitsandbytes writes them.
        bias: kept in its own (16-bit) dtype.
    """
    qs_key = next(k for k in state if k.startswith("quant_state."))
    module = Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics="nested_absmax" in state,
        quant_type=qs_key.rsplit("__", 1)[1],
        device="meta",  # no full-precision weight, not even an uninitialised one
    )
    module.weight = Params4bit.from_prequantized(packed, dict(state), requires_grad=False, device=device, module=module)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return module


def use_safe_cpu_kernels(model: nn.Module) -> int:
    """Keep every 4-bit Linear of ``model`` on CPU kernels that compute the right thing.

    This is the one place loramkit works around bitsandbytes' CPU kernels (0.50); the
    loader calls it on every 4-bit model. Returns the number of modules seen.

    1. On CPUs with AVX512_BF16, a ``Linear4bit`` in eval mode fed an input that needs no
       grad (``no_grad``, ``generate``) repacks its weight in place for a fast kernel:
       that asserts when ``out_features`` is not a multiple of 32 ("N must be divisible by
       block_n"), and once repacked, ``state_dict()`` yields a lossy or transposed absmax
       (a reload is silently wrong). ``support_avx512bf16_for_cpu = False`` turns the
       repacking off; forward then takes the same dequantize-and-matmul path as training.
    2. The AVX512 dequantization kernel assumes every quantization block lies within one
       row: when ``in_features`` is a multiple of 16 but not of ``blocksize`` (e.g. hidden
       96 with blocksize 64) it silently applies the wrong block constants, in training
       and inference alike. Blocks run over the flattened weight (spec 7.1, and
       bitsandbytes' own quantizer), so every module with ``in_features % blocksize != 0``
       (not only the ones that kernel path gets wrong today) becomes a
       :class:`FlatBlockLinear4bit`, which dequantizes by that definition on CPU.
    """
    seen = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        seen += 1
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if state is not None and module.in_features % state.blocksize and not isinstance(module, FlatBlockLinear4bit):
            module.__class__ = FlatBlockLinear4bit  # adds no state: only forward differs
    return seen


def mark_4bit(model: nn.Module) -> None:
    """Declare ``model`` a bitsandbytes 4-bit model, as transformers does for its own loads.

    ``is_loaded_in_4bit`` makes ``peft.get_peft_model`` wrap ``Linear4bit`` with its bnb
    LoRA layer (else it picks the generic one, and merging breaks) and makes
    ``prepare_model_for_kbit_training`` enable input grads; ``quantization_method`` makes
    transformers refuse ``model.to(dtype)`` and keeps the HF Trainer from moving the model.
    """
    from transformers.utils.quantization_config import QuantizationMethod

    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES


def dequantize(weight: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` weight a 4-bit state stands for, by the spec's definition (7.1).

    Blocks of ``blocksize`` values run over the row-major flattened weight, a block may
    span rows; two codes per byte, high nibble first. Values are computed in float32 and
    rounded once to ``dtype``, as bitsandbytes' kernels do.
    """
    raw = weight.as_subclass(torch.Tensor).reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    n = state.shape.numel()
    codes = torch.stack((raw >> 4, raw & 0xF), dim=1).reshape(-1)[:n]  # (n,)
    absmax = state.absmax
    if state.nested:  # 8-bit absmax codes, blockwise-scaled by nested_absmax, plus the offset
        absmax = (
            torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32
            )
            + state.offset
        )
    bs = state.blocksize
    values = state.code.float().index_select(0, codes.to(torch.int32))  # (n,)
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * bs - n))  # (nb * bs,)
    return (padded.view(-1, bs) * absmax.float().view(-1, 1)).reshape(-1)[:n].reshape(state.shape).to(dtype)


class _FlatBlockMatmul(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` dequantized in forward and again in backward, never kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: Any) -> torch.Tensor:
        ctx.weight, ctx.state, ctx.has_bias = weight, state, bias is not None
        return nn.functional.linear(x, dequantize(weight, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize(ctx.weight, ctx.state, grad.dtype)  # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


class FlatBlockLinear4bit(Linear4bit):
    """A ``Linear4bit`` whose blocks span rows (``in_features % blocksize != 0``).

    On CPU it dequantizes by the format's definition (:func:`dequantize`) instead of with
    bitsandbytes' AVX512 kernel (see :func:`use_safe_cpu_kernels`); elsewhere it is a
    plain ``Linear4bit``. It is still a ``Linear4bit``, so PEFT wraps it with its bnb LoRA layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _FlatBlockMatmul.apply(x, self.weight, bias, self.weight.quant_state).to(inp_dtype)
