"""Quantize a bundle's pruned weights to 4 bits (QLoRAM), streaming tensor by tensor.

Every q/k/v/o/gate/up/down weight of every decoder layer is converted to the bundle's
16-bit dtype and quantized with bitsandbytes (NF4 or FP4, optional double quantization),
in row chunks of whole blocks: the result is bitwise what ``bitsandbytes.functional.quantize_4bit``
gives for the whole 16-bit weight, without ever holding it. Everything else (embeddings,
norms, biases, lm_head) is converted to 16 bits in chunks. Index maps, config and tokenizer
are copied unchanged, so recovery works exactly as for the unquantized bundle.

The ``quant_state`` JSON blob's length is known only after a module is quantized, and a
safetensors header (written first) holds every length, so each shard's tensor data is
spooled to a scratch file and copied behind the header at the end; the scratch files
hold the 4-bit data, about a quarter of the source.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .. import progress
from ..bundle import Bundle, card
from ..bundle import quantization as qformat
from ..bundle.fsutil import check_out_clear, refuse_existing, staged_dir, write_json
from ..bundle.model_dir import INDEX_NAME, parse_size, plan_shards, shard_names
from ..bundle.reader import check_written
from ..bundle.safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsReader, StreamingWriter, nbytes_of, tensor_bytes
from ..bundle.writer import finalize, new_manifest
from ..errors import LoramError
from ..memory import return_large_blocks_to_os
from ._bnb import bnb

_BLOB_BOUND = 512  # bytes: an upper bound of a quant_state JSON blob, for planning shards
_CHUNK_VALUES = 1 << 22  # values quantized at a time (~16 bytes of scratch each: ~64 MiB)
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantize_bundle(
    src: str | Path | Bundle,
    out: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str = "bfloat16",
    *,
    max_shard_size: str | int = "2GiB",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write a 4-bit copy of the bundle ``src`` to ``out`` (format 1.1); returns its manifest.

    Args:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
        double_quant: also quantize the per-block constants (8-bit, blocks of 256), as QLoRA does.
        blocksize: values per quantization block over the flattened weight (64 is QLoRA's).
        compute_dtype: dtype the 4-bit layers compute in when loaded (recorded in the manifest).

    Raises:
        LoramError: bad arguments, an already quantized source, or a source that fails its
            hashes. Nothing is written then.

    Example:
        >>> quantize_bundle("llama-loram-0.85", "llama-qloram-0.85")["quantization"]["quant_type"]
        'nf4'
    """
    return_large_blocks_to_os()
    if quant_type not in qformat.QUANT_TYPES:
        raise LoramError(f"unknown quantization type {quant_type!r}; choose one of {', '.join(qformat.QUANT_TYPES)}")
    if blocksize not in qformat.BLOCKSIZES:
        raise LoramError(f"blocksize {blocksize} is not one bitsandbytes supports ({', '.join(map(str, qformat.BLOCKSIZES))})")
    if compute_dtype not in qformat.COMPUTE_DTYPES:
        raise LoramError(f"compute dtype {compute_dtype!r} is not one of {', '.join(qformat.COMPUTE_DTYPES)}")
    refuse_existing(out, overwrite)  # before hashing the source; staged_dir checks again
    check_out_clear(out, [src.path if isinstance(src, Bundle) else src])
    b = src if isinstance(src, Bundle) else Bundle(src)
    m = b.manifest
    if m.get("quantization") is not None:
        q = m["quantization"]
        raise LoramError(f"{b.path} is already quantized ({q['quant_type']}); quantize the unquantized bundle it was made from")
    if b.sparsity is not None:  # spec 7.1: format 1.2 defines no 4-bit layout of masked weights
        kind = f"{m['pruning']['strategy']} {b.sparsity['pattern'] or m['pruning']['ratio']}"
        raise LoramError(
            f"quantize does not support sparse bundles ({b.path} is {kind}): format 1.2 has no 4-bit layout for "
            "masked weights; train the sparse bundle in 16 bits, or quantize a structured bundle"
        )
    for rel in m["files"]:
        if rel != card.CARD_NAME:
            b.verify_file(rel)  # every byte read below is the one the manifest names
    storage_name = "float16" if m["weights"]["dtype"] == "float16" else "bfloat16"
    storage = _TORCH_DTYPES[storage_name]
    family = b.arch.family
    modules = [m for i in range(b.arch.num_hidden_layers) for m in family.projections(i)]  # a fused one once
    section = qformat.section(quant_type, blocksize, double_quant, compute_dtype, modules)
    targets = {f"{mod}.weight": mod for mod in modules}

    with b.weights() as ckpt, staged_dir(out, overwrite, inputs=[b.path], check=check_written) as tmp:
        names = sorted(ckpt.names(), key=lambda n: (_layer(family, n), n))
        missing = sorted(set(targets) - set(names))
        if missing:
            raise LoramError(f"{b.path}: weight {missing[0]} is missing; re-create the bundle")
        planned = []  # (source name, planned bytes)
        for n in names:
            info = ckpt.info(n)
            if n in targets:
                if len(info.shape) != 2:
                    raise LoramError(f"{b.path}: {n} has shape {list(info.shape)}, not a Linear weight")
                entries = qformat.expected_entries(targets[n], info.shape, quant_type, blocksize, double_quant)
                planned.append((n, sum(nbytes_of(dt, shp) for dt, shp in entries.values()) + _BLOB_BOUND))
            else:
                planned.append((n, nbytes_of(_out_dtype(info.dtype, storage), info.shape)))
        shards = plan_shards(planned, parse_size(max_shard_size))
        files = shard_names(len(shards))
        sha: dict[str, str] = {}
        weight_map: dict[str, str] = {}
        total = 0
        with progress.task("quantizing", sum(ckpt.info(n).nbytes for n in names), show=show_progress) as advance:
            for file, shard in zip(files, shards):
                with _Spool(tmp / f".{file}.spool") as spool:
                    for n in shard:
                        reader, info = ckpt.reader_of(n), ckpt.info(n)
                        if n in targets:
                            _quantize_weight(spool, reader, n, info.shape, storage, section)
                        else:
                            dtype = _out_dtype(info.dtype, storage)
                            spool.add(n, dtype, info.shape, _converted(reader, n, DTYPES[dtype]))
                        advance(info.nbytes)
                    sha[file] = spool.assemble(tmp / file)
                    weight_map |= {name: file for name, *_ in spool.entries}
                    total += sum(e[4] for e in spool.entries)
        if len(files) > 1:
            write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        skip = {*m["weights"]["files"], m["weights"]["index"], card.CARD_NAME}
        for rel in m["files"]:  # config, index maps, tokenizer: byte for byte
            if rel not in skip:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(b.path / rel, tmp / rel)
        manifest = new_manifest(
            requires=sorted({*m["requires"], "quantization"}),
            base=m["base"],
            architecture=m["architecture"],
            pruning=m["pruning"],
            parameters=m["parameters"],  # logical counts: quantizing changes bytes, not parameters
            weights={
                "format": "safetensors",
                "dtype": storage_name,
                "files": files,
                "index": INDEX_NAME if len(files) > 1 else None,
            },
            index_maps=m["index_maps"],
            quantization=section,
            alignment=m["alignment"],
        )
        (tmp / card.CARD_NAME).write_text(card.render(manifest), encoding="utf-8")
        return finalize(tmp, manifest, sha)


def _layer(family: Any, name: str) -> int:
    layer = family.layer_of(name.rsplit(".", 1)[0])
    return -1 if layer is None else layer


def _out_dtype(src: str, storage: torch.dtype) -> str:
    """Floating tensors become the 16-bit storage dtype; anything else is kept as is."""
    return DTYPE_NAMES[storage] if DTYPES[src].is_floating_point else src


def _converted(reader: SafetensorsReader, name: str, dtype: torch.dtype) -> Iterator[memoryview]:
    """A tensor's bytes converted to ``dtype`` piece by piece (pieces hold whole elements)."""
    src = DTYPES[reader.tensors[name].dtype]
    for piece in reader.chunks(name):
        yield piece if src == dtype else tensor_bytes(torch.frombuffer(piece, dtype=src).to(dtype))


def _quantize_weight(
    spool: _Spool, reader: SafetensorsReader, name: str, shape: tuple[int, ...], storage: torch.dtype, section: dict[str, Any]
) -> None:
    """Quantize one ``[out, in]`` weight in row chunks and spool its serialized tensors.

    Blocks run over the flattened weight, so a chunk of whole blocks (``rows * in``
    a multiple of ``blocksize``) quantizes to exactly its share of the packed codes and
    block constants; double quantization then runs once over all the constants.
    """
    functional = bnb().functional
    out_f, in_f = shape
    src = DTYPES[reader.tensors[name].dtype]
    qt, bs = section["quant_type"], section["blocksize"]
    step = bs // math.gcd(in_f, bs)  # rows per whole number of blocks
    rows = max(step, _CHUNK_VALUES // in_f // step * step)
    absmaxes: list[torch.Tensor] = []

    def packed_pieces() -> Iterator[memoryview]:
        for piece in reader.chunks(name, chunk_bytes=rows * in_f * src.itemsize):
            values = torch.frombuffer(piece, dtype=src).to(storage)  # (rows * in,) rounded as the 16-bit weight
            packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(values, bs, qt, torch.uint8)
            absmaxes.append(absmax)
            yield tensor_bytes(packed)

    module = name.removesuffix(".weight")
    n = out_f * in_f
    spool.add(name, "U8", ((n + 1) // 2, 1), packed_pieces())
    absmax = torch.cat(absmaxes)
    code = functional.get_4bit_type(qt, device="cpu")
    if section["double_quant"]:  # as bitsandbytes.functional.quantize_4bit(compress_statistics=True)
        offset = absmax.mean()
        qabsmax, state2 = functional.quantize_blockwise(absmax - offset, blocksize=qformat.NESTED_BLOCKSIZE)
        state = functional.QuantState(
            absmax=qabsmax, shape=torch.Size(shape), dtype=storage, blocksize=bs, code=code,
            quant_type=qt, offset=offset, state2=state2,
        )  # fmt: skip
    else:
        state = functional.QuantState(
            absmax=absmax, shape=torch.Size(shape), dtype=storage, blocksize=bs, code=code, quant_type=qt
        )
    for key, t in state.as_dict(packed=True).items():
        t = t.contiguous()
        spool.add(f"{module}.weight.{key}", DTYPE_NAMES[t.dtype], tuple(t.shape), [tensor_bytes(t)])


class _Spool:
    """One shard's tensor data, appended to a scratch file, then written behind its header."""

    def __init__(self, path: Path):
        self.path = path
        self.file: BinaryIO = open(path, "w+b")
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []  # name, dtype, shape, offset, nbytes

    def add(self, name: str, dtype: str, shape: tuple[int, ...], pieces: Any) -> None:
        start = self.file.tell()
        for piece in pieces:
            self.file.write(piece)
        size = self.file.tell() - start
        if size != nbytes_of(dtype, shape):  # a bug, never a user error
            raise RuntimeError(f"{name}: wrote {size} bytes for {dtype}{list(shape)}")
        self.entries.append((name, dtype, tuple(shape), start, size))

    def _read(self, start: int, size: int, chunk: int = 64 << 20) -> Iterator[bytes]:
        self.file.seek(start)
        while size > 0:
            piece = self.file.read(min(chunk, size))
            size -= len(piece)
            yield piece

    def assemble(self, target: Path) -> str:
        """Write the safetensors file; returns its sha256."""
        writer = StreamingWriter(target, [(n, d, s) for n, d, s, _, _ in self.entries], {"format": "pt"})
        try:
            for name, dtype, shape, start, size in self.entries:
                writer.write_raw(name, dtype, shape, self._read(start, size))
            return writer.close()
        except BaseException:
            writer.abort()
            raise

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)
