"""The on-disk LoRAM bundle format (specs/bundle-v1.md): read, write, validate. No training, no Hub.

``Bundle`` loads on first use (it needs torch); the format's names and helpers (manifest,
quantization tables, file helpers) import without it, so the CLI can use them at startup.
"""

from typing import Any

from .manifest import FORMAT, FORMAT_VERSION, INDEX_MAPS_NAME, MANIFEST_NAME, bundle_id

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_MAPS_NAME", "MANIFEST_NAME", "Bundle", "bundle_id"]


def __getattr__(name: str) -> Any:
    if name == "Bundle":
        from .reader import Bundle

        return Bundle
    raise AttributeError(name)
