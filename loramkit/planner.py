"""``loramkit plan``: what full fine-tuning, LoRA, QLoRA, LoRAM and QLoRAM cost for a model.

Parameter counts are exact (the families' geometry and the paper's kept-count rule).
Storage is given two ways: the paper's theoretical figure (4-bit = a quarter of 16-bit
for every parameter) and the real bytes of a bundle (bitsandbytes' packed weights and
block constants for the decoder projections, 16-bit embeddings, lm_head, norms, biases).
Training memory is an estimate: weights + trainable parameters with their gradients and
AdamW states + activations for the given batch, with and without gradient checkpointing.

The non-structured strategies (``unstructured`` at a ratio, ``semi-structured`` N:M) give
LoRAM-Unst / LoRAM-Semi rows twice: stored and trained compressed as loramkit does (kept
values + a 1-bit-per-weight mask of every sparsified projection, the rest dense: the real
bytes), and zero-filled as the paper trains them (its Table 1: the pruned weights "are
filled with zeros in actual training, so the memory footprint is not reduced"). Both rows
carry the paper's theoretical figure: 16 bits per KEPT weight.

The paper's LLaMA-2-13B figures (13,015,864,320 parameters) and what reproduces them: the
paper sparsifies every projection of all 40 layers (``--keep-first 0 --keep-last 0``; the
default 4 + 2 intact layers give 1.71x and 1.84x). Semi 2:4 keeps exactly half of each
projection: 6,671,979,520 parameters, 1.95x, as its Table 1 says; its Table 4 gives
6,738,415,616 (1.93x) for the same model, 66,436,096 more than half of the projections
leave, which no set of projections left dense gives either (it is not a multiple of
1,310,720, the gcd of their half sizes). Unst 0.55 keeps 6,037,591,040 by magnitude
(one group per matrix, 45% exactly) and 6,037,632,000 by Wanda (per row: 7,603 of 13,824
removed) and 6,037,592,960 by SparseGPT (per 128-column block), all 2.16x as the paper says;
its own parameter count, 6,037,628,912, matches none of them (nor the reference SparseGPT's
``<=`` threshold, one more weight removed per block: 6,037,579,040).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from .bundle import sparse
from .bundle.quantization import expected_entries
from .bundle.safetensors_io import nbytes_of
from .errors import LoramError
from .families import ArchSpec
from .families.geometry import LayerDims, count_parameters, expert_shapes, linear_shapes
from .families.pruning_rules import exact_ratio, plan_layers, sparse_kept_count

# Mixed-precision AdamW: bf16 weights + bf16 grads + fp32 master, m and v (full fine-tuning);
# LoRA weights train in fp32: weight + grad + m + v.
FULL_FT_BYTES_PER_PARAM = 16
LORA_BYTES_PER_PARAM = 16
METHODS = ("full fine-tuning", "LoRA", "QLoRA", "LoRAM", "QLoRAM")
STRATEGIES = ("structured", *sparse.STRATEGIES)
SPARSE_METHODS = {"unstructured": "LoRAM-Unst", "semi-structured": "LoRAM-Semi"}
ZERO_FILLED = " (zero-filled)"  # suffix of the paper's way: the same masks, dense weights with zeros
# A compressed projection's forward (and backward) expands its weight for one matmul, one
# projection at a time: the dense 16-bit weight (bundle.sparse.expand unpacks the mask in pieces
# of whole rows, at most 16 Mi weights, 16 MiB of bools, beside it; left out here).
SPARSE_TRANSIENT_BYTES_PER_WEIGHT = 2


@dataclass(frozen=True)
class MethodPlan:
    method: str
    parameters: int  # of the model trained on (a sparse model's: its kept weights)
    storage_theoretical: float  # bytes: 2 per parameter, 0.5 when 4-bit (the paper's "/4")
    storage_real: int  # bytes as a bundle stores them (zero-filled: as the paper trains, dense)
    reduction_theoretical: float  # original 16-bit bytes / storage_theoretical
    reduction_real: float
    trainable: int
    train_memory: int  # estimate, bytes, without gradient checkpointing
    train_memory_checkpointed: int


def _four_bit_bytes(arch: ArchSpec, layers: list[LayerDims], quant_type: str, blocksize: int, double_quant: bool) -> int:
    """Real bytes of a 4-bit bundle: packed projections + block constants + 16-bit everything else."""
    total_params = count_parameters(arch, layers)
    linear_params, packed = 0, 0
    for d in layers:
        for shape in linear_shapes(arch, d):
            linear_params += shape[0] * shape[1]
            entries = expected_entries("m", shape, quant_type, blocksize, double_quant)
            packed += sum(nbytes_of(dtype, s) for dtype, s in entries.values())
    return packed + 2 * (total_params - linear_params)


def _activations(arch: ArchSpec, layers: list[LayerDims], tokens: int, checkpointed: bool) -> int:
    """Saved activations (16-bit) for ``tokens`` tokens, plus the logits in fp32 with their gradient.

    Per layer and token: the residual and two norms (5h), q/k/v outputs and their rotated copies,
    attention output (3q + 3kv, memory-efficient attention: no s x s scores), the MLP's gate, up,
    activation and product (4I). With checkpointing only each layer's input is kept, plus one
    layer's activations while it is recomputed.
    """
    h, hd = arch.hidden_size, arch.head_dim

    def per_layer(d: LayerDims) -> int:
        return 2 * (5 * h + 3 * d.heads[1] * hd + 3 * d.kv_heads[1] * hd + 4 * d.intermediate[1])

    logits = tokens * arch.vocab_size * (2 + 4 + 4)  # bf16 logits, fp32 upcast, fp32 gradient
    if checkpointed:
        return tokens * (2 * h * len(layers) + max(per_layer(d) for d in layers)) + logits
    return tokens * sum(per_layer(d) for d in layers) + logits


def _lora_params(arch: ArchSpec, layers: list[LayerDims], rank: int) -> int:
    return sum(rank * (o + i) for d in layers for o, i in linear_shapes(arch, d) + expert_shapes(arch, d))


def sparse_ratio(strategy: str, ratio: float | str | None, pattern: str | None) -> tuple[Fraction, tuple[int, int] | None]:
    """(exact fraction of weights removed, (N, M) or None) of a non-structured strategy.

    Raises:
        LoramError: unstructured without a ratio or with a pattern, semi-structured without a
            pattern or with a ratio other than its 1 - N/M.
    """
    if strategy == "unstructured":
        if pattern is not None or ratio is None:
            raise LoramError("--strategy unstructured takes --ratio (the fraction of weights removed), not --pattern")
        return exact_ratio(ratio), None
    if pattern is None:
        raise LoramError("--strategy semi-structured takes --pattern N:M (e.g. 2:4)")
    n, m = sparse.parse_pattern(pattern)
    removed = Fraction(m - n, m)
    if ratio is not None and float(exact_ratio(ratio)) != float(removed):  # as prune: 1:3 has no exact decimal
        raise LoramError(f"--ratio {ratio} contradicts --pattern {pattern}, which removes {float(removed):g}; omit --ratio")
    return removed, (n, m)


def sparse_kept(shape: tuple[int, int], ratio: Fraction, importance: str, pattern: tuple[int, int] | None) -> int:
    """Weights one sparsified ``[out, in]`` projection keeps: :func:`sparse_kept_count`, refusing
    an N:M pattern that does not divide the projection's input width."""
    if pattern is not None and shape[1] % pattern[1]:
        n, m = pattern
        raise LoramError(f"the {n}:{m} pattern needs input widths that are multiples of {m}; a projection has {shape[1]}")
    return sparse_kept_count(importance, shape, ratio, pattern)


def plan(
    config: dict[str, Any],
    ratio: float | None,
    *,
    strategy: str = "structured",
    pattern: str | None = None,
    importance: str = "magnitude",
    quant_type: str = "nf4",
    keep_first: int | None = None,
    keep_last: int | None = None,
    lora_rank: int = 8,
    seq_len: int = 512,
    batch: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict[str, Any]:
    """The methods side by side for the model of ``config`` pruned at ``ratio``.

    ``strategy`` "structured": full FT, LoRA, QLoRA, LoRAM, QLoRAM. "unstructured" (at
    ``ratio``, kept counts rounded as ``importance`` groups them) or "semi-structured" (the
    N:M ``pattern``): full FT, LoRA, QLoRA, then LoRAM-Unst / LoRAM-Semi compressed and
    zero-filled (no QLoRAM: 4-bit sparse bundles are refused).
    """
    if strategy not in STRATEGIES:
        raise LoramError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy != "structured":
        removed, nm = sparse_ratio(strategy, ratio, pattern)
        return _sparse_plan(config, strategy, removed, nm, importance, quant_type=quant_type, keep_first=keep_first,
                            keep_last=keep_last, lora_rank=lora_rank, seq_len=seq_len, batch=batch, blocksize=blocksize,
                            double_quant=double_quant)  # fmt: skip
    if ratio is None:
        raise LoramError("--strategy structured takes --ratio")
    arch = ArchSpec.from_config(config)
    full, _ = plan_layers(arch, 0)
    pruned, (first, last) = plan_layers(arch, ratio, keep_first, keep_last)
    n_full, n_pruned = count_parameters(arch, full), count_parameters(arch, pruned)
    tokens = seq_len * batch
    original_bytes = 2 * n_full
    rows = []
    for method in METHODS:
        layers = pruned if method.startswith(("LoRAM", "QLoRAM")) else full
        n = n_pruned if layers is pruned else n_full
        four_bit = method.startswith("Q")
        theoretical = n * (0.5 if four_bit else 2)
        real = _four_bit_bytes(arch, layers, quant_type, blocksize, double_quant) if four_bit else 2 * n
        if method == "full fine-tuning":
            trainable, state = n, FULL_FT_BYTES_PER_PARAM * n
        else:
            trainable = _lora_params(arch, layers, lora_rank)
            state = real + LORA_BYTES_PER_PARAM * trainable
        rows.append(
            MethodPlan(
                method=method, parameters=n, storage_theoretical=theoretical, storage_real=real,
                reduction_theoretical=original_bytes / theoretical, reduction_real=original_bytes / real,
                trainable=trainable,
                train_memory=state + _activations(arch, layers, tokens, False),
                train_memory_checkpointed=state + _activations(arch, layers, tokens, True),
            )
        )  # fmt: skip
    return {
        "architecture": arch.architecture,
        "strategy": strategy,
        "ratio": ratio,
        "keep_first": first,
        "keep_last": last,
        "pruned_layers": [d.index for d in pruned if d.pruned],
        "quant_type": quant_type,
        "lora_rank": lora_rank,
        "seq_len": seq_len,
        "batch": batch,
        "original_parameters": n_full,
        "pruned_parameters": n_pruned,
        "methods": [asdict(r) for r in rows],
    }


def _sparse_plan(
    config: dict[str, Any],
    strategy: str,
    removed: Fraction,
    pattern: tuple[int, int] | None,
    importance: str,
    *,
    quant_type: str,
    keep_first: int | None,
    keep_last: int | None,
    lora_rank: int,
    seq_len: int,
    batch: int,
    blocksize: int,
    double_quant: bool,
) -> dict[str, Any]:
    """The rows of a non-structured strategy: the dense references, then compressed and zero-filled."""
    arch = ArchSpec.from_config(config)
    if arch.num_experts:
        raise LoramError(f"{arch.architecture}: sparse strategies do not support mixtures of experts (their expert tensors)")
    # Layer selection only: the sparse strategies keep every layer's dims (plan_layers at 0 prunes none).
    full, _ = plan_layers(arch, 0)
    _, (first, last) = plan_layers(arch, 0.5, keep_first, keep_last)
    sparse_layers = [d.index for d in full if removed > 0 and first <= d.index < arch.num_hidden_layers - last]
    n_full = count_parameters(arch, full)
    dense_in_layers, kept, mask_bytes, largest = 0, 0, 0, 0
    for d in full:
        if d.index not in sparse_layers:
            continue
        for shape in linear_shapes(arch, d):
            dense_in_layers += shape[0] * shape[1]
            kept += sparse_kept(shape, removed, importance, pattern)
            mask_bytes += math.prod(sparse.mask_shape(shape))  # packed: [out, ceil(in / 8)] bytes
            largest = max(largest, shape[0] * shape[1])
    n_kept = n_full - dense_in_layers + kept
    compressed = 2 * n_kept + mask_bytes  # 16-bit values, masks, 16-bit everything else
    tokens = seq_len * batch
    original_bytes = 2 * n_full
    lora = _lora_params(arch, full, lora_rank)
    activations = (_activations(arch, full, tokens, False), _activations(arch, full, tokens, True))
    qlora_real = _four_bit_bytes(arch, full, quant_type, blocksize, double_quant)
    name = SPARSE_METHODS[strategy]
    # (method, parameters, theoretical bytes, real bytes, trainable, state bytes beside the activations)
    table = [
        ("full fine-tuning", n_full, 2 * n_full, 2 * n_full, n_full, FULL_FT_BYTES_PER_PARAM * n_full),
        ("LoRA", n_full, 2 * n_full, 2 * n_full, lora, 2 * n_full + LORA_BYTES_PER_PARAM * lora),
        ("QLoRA", n_full, n_full / 2, qlora_real, lora, qlora_real + LORA_BYTES_PER_PARAM * lora),
        (name, n_kept, 2 * n_kept, compressed, lora,
         compressed + LORA_BYTES_PER_PARAM * lora + SPARSE_TRANSIENT_BYTES_PER_WEIGHT * largest),
        (name + ZERO_FILLED, n_kept, 2 * n_kept, 2 * n_full, lora, 2 * n_full + LORA_BYTES_PER_PARAM * lora),
    ]  # fmt: skip
    rows = [
        MethodPlan(
            method=method, parameters=n, storage_theoretical=theoretical, storage_real=real,
            reduction_theoretical=original_bytes / theoretical, reduction_real=original_bytes / real, trainable=trainable,
            train_memory=state + activations[0], train_memory_checkpointed=state + activations[1],
        )
        for method, n, theoretical, real, trainable, state in table
    ]  # fmt: skip
    return {
        "architecture": arch.architecture,
        "strategy": strategy,
        "ratio": float(removed),
        "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
        "importance": None if pattern else importance,
        "keep_first": first,
        "keep_last": last,
        "pruned_layers": sparse_layers,
        "quant_type": quant_type,
        "lora_rank": lora_rank,
        "seq_len": seq_len,
        "batch": batch,
        "original_parameters": n_full,
        "pruned_parameters": n_kept,
        "sparse_weights": {"dense": dense_in_layers, "kept": kept, "mask_bytes": mask_bytes},
        "methods": [asdict(r) for r in rows],
    }
