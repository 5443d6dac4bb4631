"""Open a bundle: its manifest, config and index maps, each checked against the manifest's hashes."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import BundleError
from ..families import ArchSpec
from ..families.geometry import LayerDims
from .model_dir import Checkpoint
from .fsutil import read_json
from .hashing import sha256_file
from .manifest import load_manifest


class Bundle:
    """A LoRAM bundle directory. Files are verified against their sha256 when first used."""

    def __init__(self, path: str | Path, *, check_id: bool = True):
        self.path = Path(path)
        self.manifest: dict[str, Any] = load_manifest(self.path, check_id)
        self._verified: set[str] = set()

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def base(self) -> dict[str, Any]:
        return self.manifest["base"]

    def verify_file(self, rel: str) -> Path:
        """Check one file's size and sha256 against the manifest; returns its path."""
        if rel in self._verified:
            return self.path / rel
        entry = self.manifest["files"].get(rel)
        p = self.path / rel
        if entry is None:
            raise BundleError(f"{self.path}: {rel} is not listed in the manifest")
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle; re-create or re-download it")
        if p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            raise BundleError(f"{p}: does not match its sha256 in the manifest (corrupted or modified); re-create or re-download it")
        self._verified.add(rel)
        return p

    def verify_weights(self) -> None:
        for rel in self.manifest["weights"]["files"]:
            self.verify_file(rel)
        if self.manifest["weights"].get("index"):
            self.verify_file(self.manifest["weights"]["index"])

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_json(self.verify_file("config.json"), "config.json", BundleError)

    @cached_property
    def arch(self) -> ArchSpec:
        return ArchSpec.from_config(self.config)

    @cached_property
    def layers(self) -> list[LayerDims]:
        return [LayerDims.from_json(d) for d in self.manifest["architecture"]["layers"]]

    @cached_property
    def index_maps(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.verify_file(self.manifest["index_maps"])
        try:
            return load_file(str(p))
        except SafetensorError as exc:
            raise BundleError(f"{p}: unreadable index maps ({exc})") from None

    def weights(self) -> Checkpoint:
        return Checkpoint(self.path, error=BundleError)
