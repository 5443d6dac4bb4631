"""Digests used by the manifest: files, canonical JSON, configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .. import progress

# Keys transformers rewrites on every save; they say nothing about the architecture.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


# Files at least this big get a progress bar while hashed (about half a second and up).
BAR_FROM_BYTES = 512 << 20


def sha256_file(path: str | Path, chunk: int = 1 << 22, show_progress: bool = True) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks; a (transient) bar for big files on a terminal."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress.task(f"sha256 {path.name}", size, show=show_progress and size >= BAR_FROM_BYTES,
                                              transient=True) as advance:  # fmt: skip
        while block := f.read(chunk):
            h.update(block)
            advance(len(block))
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The byte form digests are taken over (sorted keys, no spaces, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_sha256(config: dict[str, Any]) -> str:
    """Digest of a transformers config, ignoring keys that change on every save."""
    return hashlib.sha256(canonical_json({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS})).hexdigest()
