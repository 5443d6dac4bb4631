"""The on-disk LoRAM bundle format (specs/bundle-v1.md): read, write, validate. No training, no Hub."""

from .manifest import FORMAT, FORMAT_VERSION, INDEX_MAPS_NAME, MANIFEST_NAME, bundle_id
from .reader import Bundle

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_MAPS_NAME", "MANIFEST_NAME", "Bundle", "bundle_id"]
