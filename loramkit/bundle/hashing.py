"""Digests used by the manifest: files, canonical JSON, configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Keys transformers rewrites on every save; they say nothing about the architecture.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The byte form digests are taken over (sorted keys, no spaces, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_sha256(config: dict[str, Any]) -> str:
    """Digest of a transformers config, ignoring keys that change on every save."""
    return hashlib.sha256(canonical_json({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS})).hexdigest()
