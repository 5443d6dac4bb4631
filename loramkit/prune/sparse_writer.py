"""Non-structured pruning of a base checkpoint into a sparse bundle (spec 7.3), streaming layer by layer.

``unstructured`` and ``semi-structured`` (N:M) pruning keep every shape: the projections of
the pruned layers (the family's seven roles; Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
one module each) are stored as a packed bitmask plus their kept values
(:mod:`loramkit.bundle.sparse`); embeddings, lm_head, norms and biases are copied unchanged.

Every module's number of kept weights follows from the rounding rule alone
(:func:`loramkit.prune.sparse.kept_count`), so the safetensors headers are planned before any
score is computed and the tensors are written in one pass: ``magnitude`` reads one weight,
masks it and writes it; ``wanda`` and ``sparsegpt`` run the calibration text through the base
one decoder layer at a time (:func:`loramkit.prune.calibration.sequential_prune`), and each
pruned layer is written as soon as it is pruned. Peak memory: one decoder layer (SparseGPT:
plus its projections' Hessians) and the boundary activations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..bundle import card
from ..bundle import sparse as layout
from ..bundle.fsutil import check_out_clear, refuse_existing, staged_dir, write_json
from ..bundle.hashing import config_sha256
from ..bundle.manifest import INDEX_MAPS_NAME
from ..bundle.model_dir import INDEX_NAME, Checkpoint, parse_size, plan_shards, shard_names
from ..bundle.reader import check_written
from ..bundle.safetensors_io import COPY_CHUNK, DTYPES, StreamingWriter, nbytes_of, tensor_sha256, tensor_sha256_beside
from ..bundle.writer import copy_base_files, finalize, new_manifest
from ..errors import LoramError
from ..families import ArchSpec
from ..families.geometry import LayerDims
from ..families.pruning_rules import exact_ratio, layers_kept_intact
from .calibration import (
    DEFAULT_BUDGET,
    DEFAULT_SAMPLES,
    InputStatistic,
    sequential_prune,
)
from .pruner import _base_names, _check_tensors, _order_key, architecture_record, calibration_run
from .sparse import DEFINITIONS, hessian, kept_count, magnitude_mask, sparsegpt, wanda_mask

CALIBRATED = ("wanda", "sparsegpt")
DEFAULT_PATTERN = "2:4"


def sparse_settings(
    strategy: str, ratio: float | str | None, pattern: str | None, importance: str, calibration: str | Path | None
) -> tuple[Fraction, tuple[int, int] | None]:
    """The exact ratio and N:M pattern of a sparse run, or a one-line refusal of inconsistent arguments.

    ``semi-structured`` takes ``pattern`` (default 2:4); its ratio is 1 - N/M, and a ratio given
    as well must be that. ``unstructured`` takes a ratio and no pattern. Wanda and SparseGPT
    need calibration text.
    """
    if strategy not in layout.STRATEGIES:
        raise LoramError(f"unknown strategy {strategy!r}; choose structured, {' or '.join(layout.STRATEGIES)}")
    if importance not in layout.SPARSE_IMPORTANCES:
        raise LoramError(
            f"{strategy} pruning ranks weights by {', '.join(layout.SPARSE_IMPORTANCES)}, not {importance!r}; "
            "pass --importance with one of them"
        )
    if importance in CALIBRATED and calibration is None:
        raise LoramError(f"{importance} importance needs --calibration FILE (texts to run through the base)")
    if strategy == "unstructured":
        if pattern is not None:
            raise LoramError(f"--pattern {pattern} is for --strategy semi-structured; unstructured takes --ratio alone")
        if ratio is None:
            raise LoramError("--strategy unstructured needs --ratio (the fraction of weights removed, e.g. 0.5)")
        return exact_ratio(ratio), None
    n, m = layout.parse_pattern(pattern or DEFAULT_PATTERN)
    implied = 1 - Fraction(n, m)
    if ratio is not None and float(exact_ratio(ratio)) != float(implied):  # 1:3's 2/3 has no exact float
        raise LoramError(
            f"--ratio {ratio} contradicts --pattern {n}:{m}, which removes {float(implied):g} of the weights; "
            "drop --ratio or give that value"
        )
    return implied, (n, m)


def prune_sparse(
    base_dir: Path,
    out_dir: str | Path,
    ratio: float | str | None,
    *,
    strategy: str,
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
    """Prune ``base_dir`` into a sparse bundle at ``out_dir`` (see :func:`loramkit.prune.pruner.prune`)."""
    r, nm = sparse_settings(strategy, ratio, pattern, importance, calibration)
    inputs = [base_dir, calibration, offload_dir]
    check_out_clear(out_dir, inputs)
    refuse_existing(out_dir, overwrite)
    ckpt = Checkpoint(base_dir)
    try:
        arch = ArchSpec.from_config(ckpt.config)
        if arch.num_experts:
            raise LoramError(
                f"{arch.architecture}: {strategy} pruning of a mixture of experts is not supported; use --strategy structured"
            )
        _check_tensors(ckpt, arch)
        first, last = layers_kept_intact(arch.num_hidden_layers, keep_first, keep_last)
        pruned_idx = list(range(first, arch.num_hidden_layers - last))
        modules = [p for i in pruned_idx for p in arch.family.projections(i)]
        shapes = {p: tuple(ckpt.info(f"{p}.weight").shape) for p in modules}
        if nm is not None:
            for p, (_out, cols) in shapes.items():
                if cols % nm[1]:
                    raise LoramError(
                        f"--pattern {nm[0]}:{nm[1]}: {p} has {cols} input columns, not a multiple of {nm[1]}; choose another M"
                    )

        calib, settings = None, None
        if importance in CALIBRATED:
            calib, settings = calibration_run(
                ckpt, base_dir, calibration, calibration_samples, calibration_seq_len, device, offload_dir,
                activation_budget, show_progress,
            )  # fmt: skip

        plan = _Plan(ckpt, arch, shapes, importance, r, nm, parse_size(max_shard_size))
        with staged_dir(out_dir, overwrite, inputs=inputs, need_bytes=plan.total_bytes, check=check_written) as tmp:
            writer = _LayerWriter(plan, tmp)
            try:
                if calib is None:
                    with progress.task("pruning", plan.read_bytes, show=show_progress) as writer.advance:
                        for i in pruned_idx:
                            _magnitude_layer(writer, i, r, nm)
                        writer.write_until(arch.num_hidden_layers)
                else:  # the engine's bar counts the layers (one live bar at a time)
                    prune_one = _calibrated_pruner(writer, importance, r, nm, settings.dtype)
                    sequential_prune(base_dir, arch, pruned_idx, calib, _STATISTIC[importance], prune_one, settings)
                    writer.write_until(arch.num_hidden_layers)
                sha = writer.close()
            except BaseException:
                writer.abort()
                raise
            copy_base_files(base_dir, tmp)
            from safetensors.torch import save_file

            save_file({}, str(tmp / INDEX_MAPS_NAME), metadata={"format": "pt"})  # no structural change: no maps
            manifest = plan.manifest(
                base_name=base_name or str(base_dir.resolve()),
                base_revision=base_revision,
                pruning={
                    "strategy": strategy,
                    "importance": importance,
                    "ratio": float(r),
                    "rounding": "floor",
                    "keep_first": first,
                    "keep_last": last,
                    "pruned_layers": pruned_idx,
                    "seed": seed,
                    "calibration": None if calib is None else calib.record(),
                    "importance_definition": DEFINITIONS[importance],
                },
                base_tensors=writer.base_tensors,
                files=writer.files,
            )
            (tmp / card.CARD_NAME).write_text(card.render(manifest), encoding="utf-8")
            return finalize(tmp, manifest, sha)
    finally:
        ckpt.close()


_STATISTIC = {"wanda": "squares", "sparsegpt": "gram"}


class _Plan:
    """Every output tensor's name, dtype and shape, in write order, and the shards they go to."""

    def __init__(
        self,
        ckpt: Checkpoint,
        arch: ArchSpec,
        shapes: dict[str, tuple[int, int]],
        importance: str,
        ratio: Fraction,
        pattern: tuple[int, int] | None,
        max_shard_bytes: int,
    ):
        self.ckpt, self.arch, self.shapes, self.pattern = ckpt, arch, shapes, pattern
        self.names = _base_names(ckpt, arch)
        self.nnz = {p: kept_count(importance, shape, ratio, pattern) for p, shape in shapes.items()}
        self.entries: list[tuple[str, str, tuple[int, ...]]] = []
        for n in self.names:
            info = ckpt.info(n)
            module = n.removesuffix(".weight")
            if module in shapes and n.endswith(".weight"):
                expected = layout.expected_entries(module, shapes[module], self.nnz[module], info.dtype)
                self.entries += [(k, dt, shp) for k, (dt, shp) in expected.items()]
            else:
                self.entries.append((n, info.dtype, tuple(info.shape)))
        self.shards = plan_shards([(n, nbytes_of(dt, shp)) for n, dt, shp in self.entries], max_shard_bytes)
        self.total_bytes = sum(nbytes_of(dt, shp) for _, dt, shp in self.entries)
        self.read_bytes = sum(ckpt.info(n).nbytes for n in self.names)

    def manifest(
        self, *, base_name: str, base_revision: str | None, pruning: dict, base_tensors: dict, files: list[str]
    ) -> dict[str, Any]:
        arch, ckpt = self.arch, self.ckpt
        numel = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
        dtypes = {str(DTYPES[ckpt.info(n).dtype]).removeprefix("torch.") for n in self.names}
        dtype_name = dtypes.pop() if len(dtypes) == 1 else "mixed"  # as structured: validate compares them
        original = sum(numel(ckpt.info(n).shape) for n in self.names)
        sparse_weights = {f"{p}.weight" for p in self.shapes}
        dense = sum(numel(ckpt.info(n).shape) for n in self.names if n not in sparse_weights)
        H, Hkv, I = arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size
        unchanged = [LayerDims(i, False, (H, H), (Hkv, Hkv), (I, I)) for i in range(arch.num_hidden_layers)]
        return new_manifest(
            requires=[layout.FEATURE],
            base={
                "name_or_path": base_name,
                "revision": base_revision,
                "config_sha256": config_sha256(ckpt.config),
                "dtype": dtype_name,
                "num_parameters": original,
                "tensors": base_tensors,
            },
            architecture=architecture_record(arch, unchanged),  # no structural change (spec 7.3)
            pruning=pruning,
            parameters={"original": original, "pruned": dense + sum(self.nnz.values())},
            weights={
                "format": "safetensors",
                "dtype": dtype_name,
                "files": files,
                "index": INDEX_NAME if len(files) > 1 else None,
            },
            index_maps=INDEX_MAPS_NAME,
            sparsity={
                "format": "bitmask",
                "pattern": None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}",
                "modules": list(self.shapes),
            },
        )


class _LayerWriter:
    """Writes the planned tensors layer by layer: copies what is not sparsified, stores pruned modules compressed."""

    def __init__(self, plan: _Plan, out: Path):
        self.plan, self.out, self.ckpt = plan, out, plan.ckpt
        self.files = shard_names(len(plan.shards))
        entry_of = {e[0]: e for e in plan.entries}
        self.writers = [
            StreamingWriter(out / f, [entry_of[n] for n in shard], {"format": "pt"}) for f, shard in zip(self.files, plan.shards)
        ]
        self.writer_of = {n: w for w, shard in zip(self.writers, plan.shards) for n in shard}
        self.by_layer: dict[int, list[str]] = {}
        for n in plan.names:
            self.by_layer.setdefault(_order_key(plan.arch, n)[0], []).append(n)
        self.pending = sorted(self.by_layer)  # layers not yet written, -1 (outside the layers) first
        biggest = max([0] + [self.ckpt.info(f"{p}.weight").nbytes for p in plan.shapes])
        self.scratch = bytearray(max(COPY_CHUNK, biggest))
        self.base_tensors: dict[str, dict[str, Any]] = {}
        self.advance: Callable[[int], None] = lambda n: None  # base bytes done, for a progress bar

    def weight(self, module: str) -> torch.Tensor:
        """A sparsified module's base weight, read into scratch (valid until the next read)."""
        name = f"{module}.weight"
        return self.ckpt.reader_of(name).get(name, self.scratch)

    def write_until(self, layer: int) -> None:
        """Copy every layer before ``layer`` not yet written (and what lies outside the layers)."""
        while self.pending and self.pending[0] < layer:
            self.write_layer(self.pending[0], {})

    def write_layer(
        self, layer: int, pruned: dict[str, tuple[torch.Tensor, torch.Tensor]], digests: dict[str, str] | None = None
    ) -> None:
        """Write one layer's tensors; ``pruned``: module path -> (kept bool [out, in], dense pruned weight in the
        base dtype); ``digests``: the base weights' sha256 where the caller took them while reading."""
        self.write_until(layer)
        if not self.pending or self.pending[0] != layer:
            raise RuntimeError(f"layer {layer} written out of order")
        self.pending.pop(0)
        for n in self.by_layer[layer]:
            info = self.ckpt.info(n)
            module = n.removesuffix(".weight")
            if module in self.plan.shapes and n.endswith(".weight"):
                if module not in pruned:
                    raise RuntimeError(f"{module}: no pruned weight for a sparsified module")
                keep, dense = pruned[module]
                packed, values = layout.compress(dense.cpu(), keep.cpu())
                if values.numel() != self.plan.nnz[module] or values.dtype != DTYPES[info.dtype]:
                    raise RuntimeError(
                        f"{module}: {values.numel()} {values.dtype} values, planned {self.plan.nnz[module]} {info.dtype}"
                    )
                self.writer_of[layout.mask_key(module)].write(layout.mask_key(module), packed)
                self.writer_of[layout.values_key(module)].write(layout.values_key(module), values)
                digest = (digests or {}).get(n) or tensor_sha256(self.weight(module))  # the base's bytes, for base.tensors
            else:  # copied as is, in chunks: embeddings never sit whole in memory
                h = hashlib.sha256()
                self.writer_of[n].copy_from(self.ckpt.reader_of(n), n, h.update, buffer=self.scratch)
                digest = h.hexdigest()
            self.base_tensors[n] = {"dtype": info.dtype, "shape": list(info.shape), "sha256": digest}
            self.advance(info.nbytes)

    def close(self) -> dict[str, str]:
        """Finish every shard (and the shard index); the files' sha256."""
        sha = {f: w.close() for f, w in zip(self.files, self.writers)}
        if len(self.files) > 1:
            weight_map = {n: f for f, shard in zip(self.files, self.plan.shards) for n in shard}
            write_json(self.out / INDEX_NAME, {"metadata": {"total_size": self.plan.total_bytes}, "weight_map": weight_map})
        return sha

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def _magnitude_layer(writer: _LayerWriter, layer: int, ratio: Fraction, pattern: tuple[int, int] | None) -> None:
    """Mask every projection of one layer by |W| (kept values are the base's, bit for bit) and write the layer;
    each weight is read once, hashed on a worker thread while it is masked."""
    out, digests = {}, {}
    for module in writer.plan.arch.family.projections(layer):
        w = writer.weight(module)
        hashing = tensor_sha256_beside(w)
        keep = magnitude_mask(w, ratio, pattern)
        out[module] = (keep, w.masked_fill(~keep, 0))  # a fresh tensor: scratch is reused by the next read
        digests[f"{module}.weight"] = hashing.result()
    writer.write_layer(layer, out, digests)


def _calibrated_pruner(
    writer: _LayerWriter, importance: str, ratio: Fraction, pattern: tuple[int, int] | None, dtype: torch.dtype
):
    """The engine's per-layer callback: prune each projection from its input statistic, write the layer,
    and hand back the dense pruned weights (rounded to the base dtype, as stored) for the next layers' inputs."""
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def prune_layer(layer: int, weights: dict[str, tuple[torch.Tensor, InputStatistic]]) -> dict[str, torch.Tensor]:
        results = {}
        for module, (w, stat) in weights.items():
            base_dtype = DTYPES[writer.ckpt.info(f"{module}.weight").dtype]
            if importance == "wanda":
                keep = wanda_mask(w, stat.value, ratio, pattern)
                dense = w.to(base_dtype).masked_fill(~keep, 0)  # the engine's copy converts back exactly
            else:
                keep, dense = sparsegpt(
                    w.to(base_dtype), hessian(stat.value, stat.tokens), ratio, pattern, dtype=math_dtype, what=module
                )
            results[module] = (keep, dense)
        writer.write_layer(layer, results)
        return {module: dense for module, (_keep, dense) in results.items()}

    return prune_layer
