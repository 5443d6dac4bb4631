"""Assemble a bundle directory: copy base files, hash everything, write the manifest last."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .fsutil import write_json
from .hashing import sha256_file
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, bundle_id, created_by, now_utc
from .model_dir import TOKENIZER_FILES


def copy_base_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Copy config.json and, when present, tokenizer and generation files byte for byte."""
    copied = []
    for name in ("config.json", *TOKENIZER_FILES):
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
            copied.append(name)
    return copied


def new_manifest(**sections: Any) -> dict[str, Any]:
    """A manifest skeleton in the canonical key order, with the given sections filled."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "requires": [],
        "created_by": created_by(),
        "created_at": now_utc(),
        "bundle_id": None,
        "quantization": None,
        "sparsity": None,  # 1.2 writers always write it (spec 7.3)
        "alignment": None,
    }
    manifest.update(sections)
    return manifest


def finalize(out_dir: Path, manifest: dict[str, Any], known_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """Hash every file (reusing digests computed while writing), set bundle_id, write loram.json."""
    known = known_sha256 or {}
    files = {}
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            rel = p.relative_to(out_dir).as_posix()
            files[rel] = {"sha256": known.get(rel) or sha256_file(p), "size": p.stat().st_size}
    manifest["files"] = files
    manifest["bundle_id"] = bundle_id(manifest)
    write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest
