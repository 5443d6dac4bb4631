"""Safetensors read and write that never holds more than one tensor.

The safetensors library maps whole files, so every page it touches counts towards the
process's resident memory until the file is closed. Pruning and merging read a base
model tensor by tensor and write the result tensor by tensor, so here a tensor is read
with a positioned read into its own buffer, and a file is written by laying out the
header first (all shapes are known before any data) and then appending each tensor.
The files are standard safetensors: the library reads them back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BundleError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
COPY_CHUNK = 16 << 20  # pieces of untouched tensors: enough to amortise syscalls, small beside a projection
_PARALLEL_FROM = 1 << 20  # pieces at least this big are hashed on worker threads beside the write


@functools.cache
def _workers() -> ThreadPoolExecutor:
    """Two threads for sha256 (hashlib and file writes release the GIL on big buffers), so
    hashing what is read, hashing what is written and writing it share the cores."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="loramkit-sha256")


if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker) has none of the parent's threads
    os.register_at_fork(after_in_child=_workers.cache_clear)


def run_beside(tasks: list[Callable[[], object]], main: Callable[[], object]) -> None:
    """Run ``tasks`` on the worker threads while ``main`` runs here; return when all are done
    (so a buffer they read may be reused). Each task's errors are raised here."""
    futures = [_workers().submit(t) for t in tasks]
    try:
        main()
    finally:
        for f in futures:
            f.result()


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    n = torch.empty((), dtype=DTYPES[dtype]).element_size()
    for d in shape:
        n *= d
    return n


class SafetensorsReader:
    """Reads one safetensors file, checking its header against the file size first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None  # before anything can raise: __del__ closes it
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise ValueError("file is shorter than a safetensors header")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise ValueError("header length runs past the end of the file")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{self.path}: not a readable safetensors file ({exc}); re-create or re-download it") from None
        if not isinstance(header, dict):
            raise BundleError(f"{self.path}: safetensors header is not a JSON object; re-create or re-download it")
        data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        covered = 0
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)):
                    raise ValueError("shape and data_offsets must be non-negative integers")
                expected = nbytes_of(dtype, shape)
            except (KeyError, TypeError, ValueError):
                raise BundleError(f"{self.path}: malformed header entry for {name!r}") from None
            if end - begin != expected or begin < 0 or data_start + end > size:
                raise BundleError(
                    f"{self.path}: tensor {name!r} runs past the end of the file (truncated?); re-create or re-download it"
                )
            covered += end - begin
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        pos = data_start  # data must tile the buffer: no overlaps, no gaps (as the library requires)
        for info in sorted(self.tensors.values(), key=lambda i: (i.start, i.end)):
            if info.start != pos:
                raise BundleError(f"{self.path}: tensor data offsets overlap or leave gaps; re-create it")
            pos = info.end
        if data_start + covered != size:
            raise BundleError(f"{self.path}: file size does not match its header (truncated or padded); re-create it")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _read_into(self, view: memoryview, offset: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise BundleError(f"{self.path}: unexpected end of file (truncated while in use?)")
            done += n

    def get(self, name: str, buffer: bytearray | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (no mapping of the file), or into the start of
        ``buffer`` when it is big enough: then the tensor is a view of that scratch buffer,
        valid until the buffer is next written (no page faults for memory used before)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        buf = buffer if buffer is not None and len(buffer) >= info.nbytes else bytearray(info.nbytes)
        self._read_into(memoryview(buf)[: info.nbytes], info.start)
        count = info.nbytes // nbytes_of(info.dtype, ())
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype], count=count).reshape(info.shape)

    def chunks(self, name: str, chunk_bytes: int = COPY_CHUNK, buffer: bytearray | None = None) -> Iterator[memoryview]:
        """A tensor's raw bytes in pieces, for copying a tensor without holding it whole.

        Each piece is a view of ONE reused buffer (``buffer``'s start when given and at least
        one chunk long): consume it before asking for the next.
        """
        info = self.tensors[name]
        size = min(chunk_bytes, info.nbytes)
        buf = memoryview(buffer)[:size] if buffer is not None and len(buffer) >= size else memoryview(bytearray(size))
        for start in range(info.start, info.end, len(buf) or 1):
            piece = buf[: min(len(buf), info.end - start)]
            self._read_into(piece, start)
            yield piece

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw data: the weight fingerprint, independent of names and files."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def tensor_sha256_beside(t: torch.Tensor) -> Future[str]:
    """:func:`tensor_sha256` on a worker thread, so the caller computes meanwhile; take the
    result before ``t``'s memory is reused (a scratch buffer)."""
    return _workers().submit(tensor_sha256, t)


class StreamingWriter:
    """Writes a safetensors file tensor by tensor, in the order the entries were declared.

    The sha256 of the whole file is computed while writing (on a worker thread, beside the
    write itself), so a manifest needs no second read. Call :meth:`close` after the last
    tensor; it checks nothing is missing.
    """

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._order: list[tuple[str, str, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            n = nbytes_of(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            self._order.append((name, dtype, tuple(shape)))
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the library writes it
        self._hash = hashlib.sha256()
        self._file = open(self.path, "wb")
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self.size = 8 + len(blob) + offset

    def _emit(self, data: bytes | memoryview, also: Callable[[memoryview], None] | None = None) -> None:
        """Write ``data``, hashing it (and passing it to ``also``) beside the write; returns when all are done."""
        view = memoryview(data)
        tasks = [functools.partial(self._hash.update, view)] + ([functools.partial(also, view)] if also else [])
        if view.nbytes < _PARALLEL_FROM:
            for t in tasks:
                t()
            self._file.write(view)
        else:
            run_beside(tasks, functools.partial(self._file.write, view))

    def _expect(self, name: str, dtype: str | None, shape: tuple[int, ...]) -> None:
        want_name, want_dtype, want_shape = self._order[self._next]
        if (name, dtype, tuple(shape)) != (want_name, want_dtype, want_shape):
            raise RuntimeError(f"writer expected {want_name} {want_dtype}{list(want_shape)}, got {name} {dtype}{list(shape)}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._expect(name, DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
        self._emit(tensor_bytes(tensor.cpu()))
        self._next += 1

    def write_raw(self, name: str, dtype: str, shape: tuple[int, ...], pieces: Iterable[bytes | memoryview]) -> None:
        """Write a tensor given as its raw little-endian bytes, in pieces (data never held whole)."""
        self._expect(name, dtype, tuple(shape))
        got = 0
        for piece in pieces:
            self._emit(piece)
            got += memoryview(piece).nbytes
        if got != nbytes_of(dtype, shape):
            raise RuntimeError(f"{name}: got {got} bytes, {dtype}{list(shape)} needs {nbytes_of(dtype, shape)}")
        self._next += 1

    def copy_from(
        self,
        reader: SafetensorsReader,
        name: str,
        on_chunk: Callable[[memoryview], None] | None = None,
        buffer: bytearray | None = None,
    ) -> None:
        """Copy a tensor unchanged from ``reader`` in chunks (read into ``buffer`` when given);
        ``on_chunk`` sees each, in order, on a worker thread beside the write (for hashing: it
        must be done with a piece when it returns)."""
        info = reader.tensors[name]
        self._expect(name, info.dtype, info.shape)
        for piece in reader.chunks(name, buffer=buffer):
            self._emit(piece, on_chunk)
        self._next += 1

    def close(self) -> str:
        """Finish the file; returns its sha256."""
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
