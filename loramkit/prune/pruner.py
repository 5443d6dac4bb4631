"""Structured pruning of a base checkpoint into a bundle, streaming tensor by tensor.

Peak memory for ``random`` and ``magnitude`` is about one pruned projection of the base
(plus its slice): each pruned layer is read twice, once to score its units and once to
slice, and the second read comes from the page cache. Tensors that are not sliced
(embeddings, norms, unpruned layers) are copied in 16 MiB chunks. Reads land in one reused
scratch buffer and slices in another (fresh tensor-sized buffers would be page-faulted in
anew each time), magnitude scores are reduced a few units at a time, and the sha256 of
inputs and outputs run on worker threads beside the scoring and the writes. ``taylor`` and ``activation`` first
run the calibration text through the base one decoder layer at a time (see
:mod:`loramkit.prune.calibration`), then stream the same way.

``--strategy unstructured`` and ``semi-structured`` (single weights, stored sparse) are written
by :mod:`loramkit.prune.sparse_writer`; :func:`prune` is the entry point for all three.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..bundle import card
from ..bundle.fsutil import check_out_clear, refuse_existing, staged_dir, write_json
from ..bundle.hashing import config_sha256
from ..bundle.manifest import INDEX_MAPS_NAME
from ..bundle.model_dir import INDEX_NAME, Checkpoint, parse_size, plan_shards, shard_names
from ..bundle.reader import check_written
from ..bundle.safetensors_io import COPY_CHUNK, DTYPE_NAMES, DTYPES, StreamingWriter, nbytes_of, tensor_sha256_beside
from ..bundle.sparse import SPARSE_IMPORTANCES
from ..bundle.writer import copy_base_files, finalize, new_manifest
from ..errors import BaseModelError, LoramError
from ..families import ArchSpec
from ..families.geometry import LayerDims, count_parameters, layer_index_maps, pruned_shape, slice_tensor
from ..families.pruning_rules import IMPORTANCE_KINDS, plan_layers
from ..memory import return_large_blocks_to_os
from .calibration import (
    CALIBRATED,
    DEFAULT_BUDGET,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    DEFINITIONS,
    Calibration,
    EngineSettings,
    calibrated_scores,
    check_offload_dir,
    load_calibration,
)
from .importance import expert_channel_scores, group_scores, random_expert_units, random_units, top_units


def _check_tensors(ckpt: Checkpoint, arch: ArchSpec) -> None:
    names = set(ckpt.names())
    for i in range(arch.num_hidden_layers):
        per_layer = [arch.family.module(i, r, e) for r in arch.family.modules
                     for e in (range(arch.num_experts) if arch.family.per_expert(r) else [None])]  # fmt: skip
        for name in (f"{m}.weight" for m in dict.fromkeys(per_layer)):
            if name not in names:
                raise BaseModelError(f"{ckpt.path}: tensor {name} is missing; the checkpoint is incomplete")
            info = ckpt.info(name)
            if info.dtype not in ("F32", "F16", "BF16"):
                raise BaseModelError(
                    f"{ckpt.path}: {name} is {info.dtype}; prune a 16/32-bit checkpoint (quantize after pruning)"
                )
    # Norms, biases, embeddings: fewer parameters than the architecture has means one is missing,
    # and the bundle would pass validate yet fail to load (the same count validate checks).
    held = sum(ckpt.info(n).numel for n in names)
    implied = count_parameters(arch, plan_layers(arch, 0.0, 0, 0)[0])
    if held < implied:
        raise BaseModelError(
            f"{ckpt.path}: holds {held:,} parameters, its config implies {implied:,}; a tensor (a norm?) is missing"
        )


def _planned_bytes(ckpt: Checkpoint, layers: list[LayerDims], arch: ArchSpec) -> int:
    """About what the pruned weights take on disk (the base's bytes per parameter times the
    kept parameters): checked against the free space before writing."""
    infos = [ckpt.info(n) for n in ckpt.names()]
    return sum(i.nbytes for i in infos) * count_parameters(arch, layers) // max(sum(i.numel for i in infos), 1)


def _order_key(arch: ArchSpec, name: str) -> tuple[int, str]:
    layer = arch.family.layer_of(name.rsplit(".", 1)[0])
    return (-1 if layer is None else layer, name)


def _base_names(ckpt: Checkpoint, arch: ArchSpec) -> list[str]:
    """The base tensors a bundle fingerprints and stores, outside the layers first, then layer by layer.

    base.tensors is what transformers keeps on load (spec 3.2): no tied lm_head copy, no legacy inv_freq.
    """
    dropped = lambda n: n.endswith("rotary_emb.inv_freq") or (arch.tie_word_embeddings and n == f"{arch.family.lm_head}.weight")  # noqa: E731
    return sorted((n for n in ckpt.names() if not dropped(n)), key=lambda n: _order_key(arch, n))


def prune(
    base_dir: str | Path,
    out_dir: str | Path,
    ratio: float | str | None,
    *,
    strategy: str = "structured",
    pattern: str | None = None,
    importance: str = "magnitude",
    keep_first: int | None = None,
    keep_last: int | None = None,
    seed: int = 0,
    calibration: str | Path | None = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    calibration_seq_len: int | None = None,
    device: str = "cpu",
    offload_dir: str | Path | None = None,
    activation_budget: int = DEFAULT_BUDGET,
    max_shard_size: str | int = "2GiB",
    base_name: str | None = None,
    base_revision: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prune ``base_dir`` into a new bundle at ``out_dir``; returns the manifest.

    Args:
        ratio: fraction of units removed from each pruned layer, in [0, 1) (unstructured: of
            the weights of each sparsified projection; semi-structured: implied by ``pattern``).
        strategy: ``structured`` (LoRAM-Stru/Rand: whole heads and channels, shapes shrink),
            ``unstructured`` or ``semi-structured`` (LoRAM-Unst/Semi: single weights, stored
            sparse; see :mod:`loramkit.prune.sparse_writer`).
        pattern: ``"N:M"`` for semi-structured (default 2:4): N kept of every M input columns.
        importance: structured: ``random`` (LoRAM-Rand), ``magnitude``, ``taylor`` (LoRAM-Stru) or
            ``activation`` (Minitron); the last two run ``calibration`` through the base.
            Sparse: ``magnitude``, ``wanda`` or ``sparsegpt`` (the last two calibrated).
        keep_first, keep_last: layers left intact at each end (default 4 and 2, fewer
            for shallow models; see :func:`~loramkit.families.pruning_rules.layers_kept_intact`).
        calibration: text file for ``taylor``/``activation`` (.txt passages or .jsonl with 'text'),
            packed into ``calibration_samples`` blocks of ``calibration_seq_len`` tokens
            (default 512, or the model's max positions when fewer).
        device, offload_dir, activation_budget: where the calibration engine computes, and
            where boundary activations beyond ``activation_budget`` bytes spill.
        base_name, base_revision: the base's identity recorded in the manifest (default:
            the directory's absolute path, no revision).

    Raises:
        LoramError: bad arguments or a base that cannot be pruned; nothing is written.
    """
    return_large_blocks_to_os()
    base_dir = Path(base_dir)
    if seed < 0:
        raise LoramError(f"seed must be a non-negative integer, got {seed}")
    if strategy != "structured":
        from .sparse_writer import prune_sparse

        return prune_sparse(
            base_dir, out_dir, ratio, strategy=strategy, pattern=pattern, importance=importance, keep_first=keep_first,
            keep_last=keep_last, seed=seed, calibration=calibration, calibration_samples=calibration_samples,
            calibration_seq_len=calibration_seq_len, device=device, offload_dir=offload_dir,
            activation_budget=activation_budget, max_shard_size=max_shard_size, base_name=base_name,
            base_revision=base_revision, overwrite=overwrite, show_progress=show_progress,
        )  # fmt: skip
    if pattern is not None:
        raise LoramError(f"--pattern {pattern} is for --strategy semi-structured; structured pruning removes whole units")
    if ratio is None:
        raise LoramError("structured pruning needs --ratio (the fraction of heads and channels removed, e.g. 0.5)")
    if importance not in IMPORTANCE_KINDS:
        if importance in SPARSE_IMPORTANCES:
            raise LoramError(
                f"{importance} ranks single weights: use --strategy unstructured or semi-structured "
                f"(structured pruning ranks units by {', '.join(IMPORTANCE_KINDS)})"
            )
        raise LoramError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE_KINDS)}")
    if importance in CALIBRATED and calibration is None:
        raise LoramError(f"{importance} importance needs --calibration FILE (texts to run through the base)")
    inputs = [base_dir, calibration, offload_dir]
    check_out_clear(out_dir, inputs)  # before any (taylor: long) work; staged_dir checks again
    refuse_existing(out_dir, overwrite)
    ckpt = Checkpoint(base_dir)
    try:
        arch = ArchSpec.from_config(ckpt.config)
        _check_tensors(ckpt, arch)
        layers, (first, last) = plan_layers(arch, ratio, keep_first, keep_last)
        pruned_idx = [d.index for d in layers if d.pruned]

        calib_record = None
        taylor: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if importance in CALIBRATED:
            calib, settings = calibration_run(
                ckpt, base_dir, calibration, calibration_samples, calibration_seq_len, device, offload_dir,
                activation_budget, show_progress,
            )  # fmt: skip
            taylor = calibrated_scores(base_dir, arch, pruned_idx, calib, importance, settings)
            calib_record = calib.record()

        need = _planned_bytes(ckpt, layers, arch)
        with staged_dir(out_dir, overwrite, inputs=inputs, need_bytes=need, check=check_written) as tmp:
            manifest = _stream(ckpt, arch, layers, importance, seed, taylor, tmp, parse_size(max_shard_size), show_progress)
            copy_base_files(base_dir, tmp)
            manifest.update(
                base=dict(
                    name_or_path=base_name or str(base_dir.resolve()),
                    revision=base_revision,
                    config_sha256=config_sha256(ckpt.config),
                    **manifest.pop("base_weights"),
                ),
                pruning={
                    "strategy": "structured",
                    "importance": importance,
                    "ratio": float(ratio),  # a JSON number even when given as text
                    "rounding": "paper",
                    "keep_first": first,
                    "keep_last": last,
                    "pruned_layers": pruned_idx,
                    "seed": seed,
                    "calibration": calib_record,
                    **({"importance_definition": DEFINITIONS[importance]} if importance in CALIBRATED else {}),
                },
            )
            (tmp / card.CARD_NAME).write_text(card.render(manifest), encoding="utf-8")
            return finalize(tmp, manifest, manifest.pop("_sha256"))
    finally:
        ckpt.close()


def calibration_run(
    ckpt: Checkpoint,
    base_dir: Path,
    calibration: str | Path,
    samples: int,
    seq_len: int | None,
    device: str,
    offload_dir: str | Path | None,
    budget: int,
    show_progress: bool,
) -> tuple[Calibration, EngineSettings]:
    """The calibration blocks (``seq_len`` default 512, or the model's max positions when fewer) and the engine's settings."""
    offload = None if offload_dir is None else Path(offload_dir)
    check_offload_dir(offload)
    max_pos = ckpt.config.get("max_position_embeddings")
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, max_pos or DEFAULT_SEQ_LEN)
    calib = load_calibration(Path(calibration), base_dir, max_pos, samples, seq_len)
    return calib, EngineSettings(device=device, budget=budget, offload_dir=offload, show_progress=show_progress)


def architecture_record(arch: ArchSpec, layers: list[LayerDims]) -> dict[str, Any]:
    """The manifest's ``architecture``: the base's shape and each layer's original and kept dims."""
    return {
        "family": arch.family.name,
        "model_type": arch.model_type,
        "architecture": arch.architecture,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "layers": [d.to_json() for d in layers],
    }


def _square(w: torch.Tensor) -> torch.Tensor:
    return w.float().square()  # not in place: for a float32 base, .float() is the weight itself


def _kept_units(
    weight: Callable[[str], torch.Tensor | None], arch: ArchSpec, dims: LayerDims, importance: str, seed: int, taylor: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept KV groups, kept MLP channels) of one pruned layer, ascending; ``weight(name)``
    reads a tensor of the base (None when absent), each valid until the next call."""
    i, k_kv, k_ch = dims.index, dims.kv_heads[1], dims.intermediate[1]
    E = arch.num_experts  # a mixture of experts: channels kept per expert, (E, k_ch)
    if importance == "random":
        return (
            random_units(arch.num_key_value_heads, k_kv, seed, i, 0),
            random_expert_units(E, arch.intermediate_size, k_ch, seed, i)
            if E
            else random_units(arch.intermediate_size, k_ch, seed, i, 1),
        )
    if importance in CALIBRATED:
        kv, ch = taylor[i]
    else:  # magnitude: L2 norm over the group's weights, one tensor in memory at a time, squared block by block
        kv, ch = group_scores(arch, i, weight, _square)
        kv, ch = kv.sqrt(), (expert_channel_scores(arch, i, weight, _square) if E else ch).sqrt()
    if E:
        return top_units(kv, k_kv), torch.stack([top_units(row, k_ch) for row in ch])
    return top_units(kv, k_kv), top_units(ch, k_ch)


def _slice_into(t: torch.Tensor, name: str, maps: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """:func:`slice_tensor` written into ``out`` (a scratch view of the sliced shape)."""
    dims = [d for d in range(t.dim()) if f"{name}:{d}" in maps]
    if len(dims) == 1:
        torch.index_select(t, dims[0], maps[f"{name}:{dims[0]}"], out=out)
    else:
        out.copy_(slice_tensor(t, name, maps))


def _stream(
    ckpt: Checkpoint,
    arch: ArchSpec,
    layers: list[LayerDims],
    importance: str,
    seed: int,
    taylor: dict,
    out: Path,
    max_shard_bytes: int,
    show_progress: bool,
) -> dict[str, Any]:
    names = _base_names(ckpt, arch)
    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(_order_key(arch, n)[0], []).append(n)
    tensor_names = set(names)

    # Shapes are fixed by the kept counts alone, so shards and headers are planned up front
    # from maps of the right lengths; the real indices come when each layer is scored.
    placeholder: dict[str, torch.Tensor] = {}
    for d in layers:
        if d.pruned:
            channels = torch.arange(d.intermediate[1])
            channels = channels.expand(arch.num_experts, -1) if arch.num_experts else channels  # (E, k): per expert
            placeholder |= layer_index_maps(arch, d.index, torch.arange(d.kv_heads[1]), channels, tensor_names)
    out_entries = []
    for n in names:
        info = ckpt.info(n)
        out_entries.append((n, info.dtype, pruned_shape(info.shape, n, placeholder)))
    shards = plan_shards([(n, nbytes_of(dt, shp)) for n, dt, shp in out_entries], max_shard_bytes)
    files = shard_names(len(shards))
    entry_of = {e[0]: e for e in out_entries}
    sliced = {k.rsplit(":", 1)[0] for k in placeholder}
    # Scratch: every read (whole pruned tensors, copy chunks) lands in `scratch`, every slice in `sliced_out`.
    scratch = bytearray(max([COPY_CHUNK] + [ckpt.info(n).nbytes for n in sliced]))
    sliced_out = bytearray(max([0] + [nbytes_of(*entry_of[n][1:]) for n in sliced]))
    hashing: dict[str, Future[str]] = {}  # inputs hashed while being scored (a worker thread reads scratch)

    def weight(n: str) -> torch.Tensor | None:
        """A base tensor for scoring, read into scratch once the previous one's hash is done."""
        for f in hashing.values():
            f.result()
        if n not in tensor_names:
            return None
        t = ckpt.reader_of(n).get(n, scratch)
        hashing[n] = tensor_sha256_beside(t)
        return t

    base_tensors: dict[str, dict[str, Any]] = {}
    digests: dict[str, str] = {}
    maps: dict[str, torch.Tensor] = {}
    sha: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    total_read = sum(ckpt.info(n).nbytes for n in names)
    writers = [StreamingWriter(out / f, [entry_of[n] for n in shard], {"format": "pt"}) for f, shard in zip(files, shards)]
    writer_of = {n: w for w, shard in zip(writers, shards) for n in shard}
    try:
        with progress.task("pruning", total_read, show=show_progress) as advance:
            for layer, members in by_layer.items():
                layer_maps: dict[str, torch.Tensor] = {}
                if layer >= 0 and layers[layer].pruned:
                    hashing.clear()
                    kv, ch = _kept_units(weight, arch, layers[layer], importance, seed, taylor)
                    digests = {n: f.result() for n, f in hashing.items()}
                    layer_maps = layer_index_maps(arch, layer, kv, ch, tensor_names)
                    maps |= layer_maps
                for n in members:
                    info = ckpt.info(n)
                    if any(k.startswith(f"{n}:") for k in layer_maps):
                        t = ckpt.reader_of(n).get(n, scratch)
                        pending = None if n in digests else tensor_sha256_beside(t)
                        _, dtype, shape = entry_of[n]
                        count = nbytes_of(dtype, shape) // t.element_size()
                        piece = (
                            torch.frombuffer(sliced_out, dtype=DTYPES[dtype], count=count)
                            if count
                            else torch.empty(0, dtype=t.dtype)
                        )
                        _slice_into(t, n, layer_maps, piece.view(shape))
                        digest = digests[n] if pending is None else pending.result()
                        writer_of[n].write(n, piece.view(shape))
                        del t, piece
                    else:  # copied as is, in chunks: embeddings never sit whole in memory
                        h = hashlib.sha256()
                        writer_of[n].copy_from(ckpt.reader_of(n), n, h.update, buffer=scratch)
                        digest = h.hexdigest()
                    base_tensors[n] = {"dtype": info.dtype, "shape": list(info.shape), "sha256": digest}
                    advance(info.nbytes)
        for f, w in zip(files, writers):
            sha[f] = w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for f, shard in zip(files, shards):
        weight_map |= {n: f for n in shard}
    if len(files) > 1:
        total = sum(nbytes_of(dt, shp) for _, dt, shp in out_entries)
        write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

    from safetensors.torch import save_file

    save_file(maps, str(out / INDEX_MAPS_NAME), metadata={"format": "pt"})
    numel = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
    dtype_name = str(DTYPES[ckpt.info(names[0]).dtype]).removeprefix("torch.")
    dtypes = {DTYPE_NAMES[DTYPES[ckpt.info(n).dtype]] for n in names}
    return new_manifest(
        base_weights={
            "dtype": dtype_name if len(dtypes) == 1 else "mixed",  # as weights.dtype: validate compares them
            "num_parameters": sum(numel(ckpt.info(n).shape) for n in names),
            "tensors": base_tensors,
        },
        architecture=architecture_record(arch, layers),
        parameters={
            "original": sum(numel(ckpt.info(n).shape) for n in names),
            "pruned": sum(numel(shp) for _, _, shp in out_entries),
        },
        weights={
            "format": "safetensors",
            "dtype": dtype_name if len(dtypes) == 1 else "mixed",
            "files": files,
            "index": INDEX_NAME if len(files) > 1 else None,
        },
        index_maps=INDEX_MAPS_NAME,
        _sha256=sha,
    )
