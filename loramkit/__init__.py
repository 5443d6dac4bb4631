"""loramkit: LoRAM (Train Small, Infer Large) as a toolkit.

Prune a large model into a bundle, train LoRA on the bundle, recover the adapter onto
the original model.
"""

__version__ = "0.1.0"

from .errors import LoramError  # noqa: E402

# Everything else loads on first use: torch, transformers and peft take seconds to import,
# and `import loramkit` or `loramkit --help` need none of them (tests/test_layers.py checks).
_LAZY = {
    "Bundle": ("bundle.reader", "Bundle"),
    "load_pruned_model": ("model.loader", "load_pruned_model"),
    "prune_model": ("prune.pruner", "prune"),
    "quantize_bundle": ("quant.convert", "quantize_bundle"),
    "prune_quantized": ("pipeline", "prune_quantized"),
    "recover_adapter": ("recover.adapter", "recover_adapter"),
    "merge_adapter": ("recover.merge", "merge_adapter"),
    "validate_bundle": ("bundle.validate", "validate"),
    "train": ("train.trainer", "train"),
    "align": ("train.align", "align"),
    "AlignConfig": ("train.config", "AlignConfig"),
    "TrainConfig": ("train.config", "TrainConfig"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(name)


__all__ = ["LoramError", "__version__", *_LAZY]
