"""Steps that chain several packages: they sit above prune/ and quant/, which know nothing of each other."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from .bundle import quantization as qformat
from .bundle.fsutil import check_out_clear, output_lock, recover_leftovers, refuse_existing
from .errors import LoramError


def check_quantizable(strategy: str) -> None:
    """``prune --quantize`` of a sparse strategy is refused before any work (spec 7.1: no 4-bit sparse layout)."""
    if strategy != "structured":
        raise LoramError(
            f"quantize does not support sparse bundles (--strategy {strategy}): format 1.2 has no 4-bit layout for "
            "masked weights; train the sparse bundle in 16 bits, or quantize a structured bundle"
        )


def prune_quantized(
    base_dir: str | Path,
    out_dir: str | Path,
    ratio: float,
    quant_type: str = "nf4",
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    **prune_kw: Any,
) -> dict[str, Any]:
    """Prune ``base_dir`` and quantize the result into ``out_dir`` (``loramkit prune --quantize``).

    The 16-bit bundle is pruned into a hidden sibling of ``out_dir`` and removed afterwards,
    so ``out_dir`` appears whole (quantized) or not at all. ``prune_kw`` go to
    :func:`loramkit.prune.pruner.prune`; quantization uses the defaults of
    :func:`loramkit.quant.convert.quantize_bundle`.
    """
    from .prune.pruner import prune
    from .quant.convert import quantize_bundle

    check_quantizable(prune_kw.get("strategy", "structured"))
    if quant_type not in qformat.QUANT_TYPES:
        raise LoramError(f"unknown quantization type {quant_type!r}; choose one of {', '.join(qformat.QUANT_TYPES)}")
    out = Path(out_dir)
    check_out_clear(out, [base_dir, prune_kw.get("calibration"), prune_kw.get("offload_dir")])
    with output_lock(out) as fresh:  # OUT is this run's from the scratch bundle to the quantized one
        if fresh:
            recover_leftovers(out)  # a killed run's scratch bundle too
        refuse_existing(out, overwrite)
        scratch = out.parent / f".{out.name}.tmp-prune-{uuid.uuid4().hex[:8]}"
        try:
            prune(base_dir, scratch, ratio, show_progress=show_progress, **prune_kw)
            shard = prune_kw.get("max_shard_size", "2GiB")
            return quantize_bundle(
                scratch, out, quant_type, max_shard_size=shard, overwrite=overwrite, show_progress=show_progress
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
