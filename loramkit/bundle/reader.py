"""Open a bundle: its manifest, config and index maps, each checked against the manifest's hashes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import BundleError
from ..families import ArchSpec
from ..families.geometry import LayerDims
from .fsutil import read_json
from .hashing import sha256_file
from .manifest import load_manifest
from .model_dir import TOKENIZER_FILES, Checkpoint


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

    @property
    def sparsity(self) -> dict[str, Any] | None:
        """The ``sparsity`` record (spec 7.3), or None: dense weights (absent in 1.0/1.1 manifests)."""
        return self.manifest.get("sparsity")

    @property
    def sparse_modules(self) -> set[str]:
        """Module paths (no ``.weight``) stored as mask + values; empty for a dense bundle."""
        return set(self.sparsity["modules"]) if self.sparsity else set()

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
            raise BundleError(
                f"{p}: does not match its sha256 in the manifest (corrupted or modified); re-create or re-download it"
            )
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

    def raw_index_maps(self) -> dict[str, torch.Tensor]:
        """The index maps file as stored (hash-verified, not yet checked): for ``validate``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.verify_file(self.manifest["index_maps"])
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{p}: unreadable index maps ({exc})") from None

    @cached_property
    def index_maps(self) -> dict[str, torch.Tensor]:
        """The index maps, after the checks ``validate`` applies (one shared implementation):
        each map well formed (:func:`index_map_problems`) and every layer's maps consistent
        across its coupled group, in whole heads, with the counts the manifest records."""
        from .validate import coupled_map_problems

        maps = self.raw_index_maps()
        where = self.path / self.manifest["index_maps"]
        problem = next(iter(index_map_problems(maps, self.base["tensors"])), None)
        if problem is None and [d.index for d in self.layers] == list(range(self.arch.num_hidden_layers)):
            problem = next(iter(coupled_map_problems(self.arch, self.layers, maps, self.base["tensors"])[0]), None)
        elif problem is None:
            problem = "architecture.layers does not list every layer once, in order"
        if problem is not None:
            raise BundleError(f"{where}: {problem}; re-create the bundle")
        return maps

    @contextmanager
    def verified_copy(self, names: tuple[str, ...] = ("config.json", *TOKENIZER_FILES)) -> Iterator[Path]:
        """A private directory holding the listed ``names`` (tokenizer, chat template, config),
        each verified against its sha256: what ``from_pretrained`` may read, so it never sees
        an unlisted or modified file of the bundle."""
        with tempfile.TemporaryDirectory(prefix="loramkit-verified-") as tmp:
            for name in names:
                if name in self.manifest["files"]:
                    shutil.copyfile(self.verify_file(name), Path(tmp) / name)
            yield Path(tmp)

    def weights(self) -> Checkpoint:
        """The weight files the manifest lists (and its index, if any); nothing else is opened."""
        w = self.manifest["weights"]
        return Checkpoint(self.path, error=BundleError, listed=(list(w["files"]), w.get("index")))


def index_map_problems(maps: dict[str, torch.Tensor], base_tensors: dict[str, Any]) -> list[str]:
    """The checks every reader and ``validate`` apply to index maps before any use: each key
    names a base tensor and one of its dimensions, each map is a 1-D int64 vector, strictly
    ascending (so sorted and without duplicates) and inside that dimension.

    A map breaking these would scatter rows to the wrong places (recover) or read past a tensor.
    """
    out: list[str] = []
    for key, t in maps.items():
        tensor, _, dim = key.rpartition(":")
        shape = base_tensors.get(tensor, {}).get("shape") if isinstance(base_tensors.get(tensor), dict) else None
        if shape is None or not dim.isdigit() or int(dim) >= len(shape):
            out.append(f"index map {key!r} does not name a base tensor and one of its dimensions (tensor:dim)")
        elif t.dtype != torch.int64 or t.dim() != 1:
            out.append(f"index map {key} must be a 1-D int64 tensor, not {str(t.dtype).removeprefix('torch.')}{list(t.shape)}")
        elif t.numel() and (int(t.min()) < 0 or int(t.max()) >= shape[int(dim)]):
            out.append(f"index map {key} points outside {tensor} (dimension {dim} has {shape[int(dim)]})")
        elif t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            out.append(f"index map {key} is not strictly ascending (unsorted or duplicate indices)")
    return out


def check_written(path: Path) -> None:
    """A writer's last look at what it wrote, before the rename makes it the output: the manifest
    as a reader reads it (schema, id, paths), the index maps' checks and the weight headers
    (not a second hash of the weights: finalize just took them). Raises BundleError: a writer
    bug, never shipped as a bundle."""
    b = Bundle(path)
    _ = b.index_maps  # reading them runs the readers' index-map checks
    with b.weights():
        pass


@contextmanager
def tokenizer_source(path: str | Path) -> Iterator[Path]:
    """Where ``AutoTokenizer.from_pretrained`` may read: a bundle's verified copy
    (:meth:`Bundle.verified_copy`), or a plain model directory as it is."""
    path = Path(path)
    if (path / "loram.json").is_file():
        with Bundle(path).verified_copy() as tmp:
            yield tmp
    else:
        yield path
