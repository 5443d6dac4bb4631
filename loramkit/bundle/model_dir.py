"""A transformers model directory (config.json + safetensors shards), read tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import BaseModelError, BundleError
from .fsutil import read_json
from .safetensors_io import SafetensorsReader, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from a base into a bundle (and into a merged model) when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


class Checkpoint:
    """The weights of one model directory: which file holds which tensor, with dtypes and shapes.

    Reading goes through :class:`SafetensorsReader`, so memory holds one tensor at a time.
    """

    def __init__(
        self,
        path: str | Path,
        error: type[Exception] = BaseModelError,
        *,
        listed: tuple[list[str], str | None] | None = None,
    ):
        """``listed``: (weight files, index file or None) a bundle's manifest names; then only
        those are opened, and an index may map tensors only to those files (nothing else in
        the directory is looked at: an unlisted index is never followed)."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise error(f"{self.path}: no such model directory")
        self.config: dict[str, Any] = read_json(self.path / "config.json", "config.json", error)
        index = self.path / (listed[1] or INDEX_NAME if listed else INDEX_NAME)
        if listed is not None and listed[1] is None:
            files, weight_map = sorted(listed[0]), None
        elif index.exists():
            weight_map = read_json(index, INDEX_NAME, error).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise error(f"{index}: has no weight_map of tensor names to file names")
            files = sorted(set(weight_map.values()))
            allowed = set(listed[0]) if listed is not None else None
            for name in files:  # a shard is a file of this directory (and of the manifest), never a path out of it
                if Path(name).name != name or name in (".", "..") or (allowed is not None and name not in allowed):
                    raise error(f"{index}: maps tensors to {name!r}, which is not a weight file of {self.path}")
        elif (self.path / SINGLE_NAME).exists():
            files, weight_map = [SINGLE_NAME], None
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                bins = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
                hint = " (found pickle checkpoints, which loramkit never loads: save the model with safetensors)" if bins else ""
                raise error(f"{self.path}: no safetensors weights{hint}")
            files, weight_map = found, None
        self.files: list[str] = files
        self.readers: dict[str, SafetensorsReader] = {}
        self.where: dict[str, str] = {}
        for name in files:
            if not (self.path / name).exists():
                raise error(f"{self.path / name}: listed in {INDEX_NAME} but missing")
            try:
                reader = SafetensorsReader(self.path / name)
            except BundleError as exc:  # same message, the caller's error type
                raise error(str(exc)) from None
            self.readers[name] = reader
            for key in reader.keys():
                self.where[key] = name
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self.where)
            if missing:
                raise error(f"{index}: tensor {missing[0]} is listed but not in its file")

    def info(self, name: str) -> TensorInfo:
        return self.readers[self.where[name]].tensors[name]

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self.readers[self.where[name]].get(name)

    def reader_of(self, name: str) -> SafetensorsReader:
        return self.readers[self.where[name]]

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_shards(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors (name, nbytes), in order, into shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own, as transformers does.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in entries:
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '200KB' or a byte count -> bytes (powers of 1000, like transformers)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for suffix, mult in (
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
        ("B", 1),
    ):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)
