"""QLoRAM: bitsandbytes NF4 / FP4 weights in and out of bundles (specs/bundle-v1.md 7.1).

``quantize_bundle`` writes a 4-bit copy of a bundle (format 1.1); the loader rebuilds its
quantized Linears as ``bitsandbytes.nn.Linear4bit`` through :mod:`loramkit.quant.layers`,
which is imported only for 4-bit bundles (it imports bitsandbytes). Pruning and quantizing
in one step is :func:`loramkit.pipeline.prune_quantized`, above both packages.
"""

from .convert import quantize_bundle

__all__ = ["quantize_bundle"]
