"""How 4-bit (bitsandbytes NF4 / FP4) weights are laid out in a bundle (specs/bundle-v1.md 7.1).

Format knowledge only, no bitsandbytes: the names, dtypes and shapes of each quantized
Linear's serialized state and the ``quant_state`` JSON blob. The writer
(:mod:`loramkit.quant`), the loader and the validator all read it from here.

A quantized Linear ``W`` with logical weight ``[out, in]`` (``n = out * in`` values,
``nb = ceil(n / blocksize)`` blocks over the row-major flattened weight) is stored as::

    W.weight                                  U8  [ceil(n / 2), 1]   two 4-bit codes per byte, high nibble first
    W.weight.absmax                           F32 [nb]   (U8 [nb] with double quantization)
    W.weight.quant_map                        F32 [16]   the code table of quant_type
    W.weight.nested_absmax                    F32 [ceil(nb / 256)]   double quantization only
    W.weight.nested_quant_map                 F32 [256]              double quantization only
    W.weight.quant_state.bitsandbytes__<qt>   U8  [len]  UTF-8 JSON object
"""

from __future__ import annotations

import json
import math
from typing import Any

METHOD = "bitsandbytes"
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
NESTED_BLOCKSIZE = 256  # double quantization: absmax is quantized to 8 bits in blocks of 256
QUANT_STORAGE = "uint8"
# dtype of everything not stored in 4 bits, and what the 4-bit weights dequantize to.
STORAGE_DTYPES = ("bfloat16", "float16")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
UNQUANTIZED = "embeddings, norms, biases and lm_head stay 16-bit"
STATE_PREFIX = "quant_state.bitsandbytes__"

# The 16 values each 4-bit code stands for (bitsandbytes' tables, exact float32 values).
QUANT_MAPS: dict[str, tuple[float, ...]] = {
    "nf4": (
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ),
    "fp4": (
        0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
        0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
        -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
    ),
}  # fmt: skip


def blob_key(module: str, quant_type: str) -> str:
    return f"{module}.weight.{STATE_PREFIX}{quant_type}"


def num_blocks(numel: int, blocksize: int) -> int:
    return math.ceil(numel / blocksize)


def expected_entries(
    module: str, shape: tuple[int, int], quant_type: str, blocksize: int, double_quant: bool
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (safetensors dtype, shape) of every tensor of one quantized Linear but the JSON blob.

    The blob (:func:`blob_key`) is ``U8 [len]`` with a length known only once it is written.
    """
    n = shape[0] * shape[1]
    nb = num_blocks(n, blocksize)
    w = f"{module}.weight"
    entries = {
        w: ("U8", ((n + 1) // 2, 1)),
        f"{w}.absmax": ("U8" if double_quant else "F32", (nb,)),
        f"{w}.quant_map": ("F32", (16,)),
    }
    if double_quant:
        entries[f"{w}.nested_absmax"] = ("F32", (num_blocks(nb, NESTED_BLOCKSIZE),))
        entries[f"{w}.nested_quant_map"] = ("F32", (256,))
    return entries


def state_keys(module: str, quant_type: str, double_quant: bool) -> list[str]:
    """Every stored tensor name of one quantized Linear's weight, the JSON blob last."""
    return [*expected_entries(module, (1, 1), quant_type, 64, double_quant), blob_key(module, quant_type)]


def parse_quant_state(raw: bytes) -> dict[str, Any]:
    """The quant_state blob as a JSON object.

    Raises:
        ValueError: not UTF-8, not JSON, or not an object.
    """
    value = json.loads(raw.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def quant_state_problems(state: dict[str, Any], shape: tuple[int, int], section: dict[str, Any], storage_dtype: str) -> list[str]:
    """How a module's parsed quant_state disagrees with its logical shape and the manifest."""
    want: dict[str, Any] = {
        "quant_type": section["quant_type"],
        "blocksize": section["blocksize"],
        "dtype": storage_dtype,
        "shape": list(shape),
    }
    if section["double_quant"]:
        want |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32"}
    problems = [f"{k} is {state.get(k)!r}, expected {v!r}" for k, v in want.items() if state.get(k) != v]
    offset = state.get("nested_offset")
    if section["double_quant"]:
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            problems.append(f"nested_offset is {offset!r}, expected a finite number")
    extra = sorted(set(state) - set(want) - ({"nested_offset"} if section["double_quant"] else set()))
    if extra:
        problems.append(f"unexpected keys {', '.join(extra)}")
    return problems


def section(quant_type: str, blocksize: int, double_quant: bool, compute_dtype: str, modules: list[str]) -> dict[str, Any]:
    """The manifest's ``quantization`` object (spec 7.1)."""
    return {
        "method": METHOD,
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "compute_dtype": compute_dtype,
        "quant_storage": QUANT_STORAGE,
        "modules": modules,
        "unquantized": UNQUANTIZED,
    }
