"""Put a 4-bit bundle's quantized Linears into a model being loaded (used by the loader)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..bundle import Bundle
from ..bundle import quantization as qformat
from ..bundle.model_dir import Checkpoint
from ..errors import BundleError
from .layers import build_linear4bit

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_4bit_linears(
    model: nn.Module,
    b: Bundle,
    ckpt: Checkpoint,
    shapes: dict[str, tuple[int, ...]],
    device: str | torch.device,
    dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
) -> set[str]:
    """Replace each module the manifest lists as 4-bit by a ``Linear4bit`` built from its state.

    Every stored tensor's dtype and shape is checked against the manifest before it is
    read, and each ``quant_state`` against the manifest's settings.

    Args:
        shapes: logical (unquantized) shape of every tensor, from the manifest and index maps.
        dtype: dtype for the modules' biases, like every other tensor not stored in 4 bits.
        compute_dtype: what the 4-bit layers compute in; None: the manifest's ``compute_dtype``.

    Returns:
        The stored tensor names consumed (weights, their state, biases).
    """
    q = b.manifest["quantization"]
    storage = b.manifest["weights"]["dtype"]
    compute = compute_dtype or _TORCH_DTYPES[q["compute_dtype"]]
    family = b.arch.family
    stored = set(ckpt.names())
    done: set[str] = set()
    for module in q["modules"]:
        if family.role_of(module) is None:
            raise BundleError(f"{b.path}: quantization lists {module}, which is not a decoder-layer projection")
        weight = f"{module}.weight"
        shape = shapes.get(weight)
        old = _get(model, module)
        if shape is None or not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != tuple(shape):
            raise BundleError(f"{b.path}: quantized module {module} does not match the model's {module}")
        entries = qformat.expected_entries(module, shape, q["quant_type"], q["blocksize"], q["double_quant"])
        blob = qformat.blob_key(module, q["quant_type"])
        for key, (dt, shp) in entries.items():
            info = ckpt.info(key) if key in stored else None
            if info is None or (info.dtype, info.shape) != (dt, shp):
                got = "missing" if info is None else f"{info.dtype}{list(info.shape)}"
                raise BundleError(f"{b.path}: {key} is {got}, the manifest implies {dt}{list(shp)}; re-create the bundle")
        info = ckpt.info(blob) if blob in stored else None
        if info is None or info.dtype != "U8" or len(info.shape) != 1 or info.nbytes > 1 << 16:
            raise BundleError(f"{b.path}: {blob} is missing or not a small U8 vector; re-create the bundle")
        try:
            state_json = qformat.parse_quant_state(bytes(ckpt.get(blob).numpy()))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{b.path}: {blob} is not a JSON object ({exc}); re-create the bundle") from None
        problems = qformat.quant_state_problems(state_json, shape, q, storage)
        if problems:
            raise BundleError(f"{b.path}: {blob}: {problems[0]}; re-create the bundle")
        state: dict[str, Any] = {key.removeprefix(f"{weight}."): ckpt.get(key) for key in [*entries, blob] if key != weight}
        bias_name = f"{module}.bias"
        if (old.bias is not None) != (bias_name in stored) or (
            bias_name in stored and ckpt.info(bias_name).shape != tuple(shapes.get(bias_name, ()))
        ):
            raise BundleError(f"{b.path}: {bias_name} is missing, unexpected or of the wrong shape; re-create the bundle")
        bias = ckpt.get(bias_name).to(dtype) if bias_name in stored else None
        new = build_linear4bit(shape[1], shape[0], ckpt.get(weight), state, bias, compute, device)
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        done |= {*entries, blob} | ({bias_name} if bias is not None else set())
    return done


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
