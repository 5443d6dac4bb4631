"""``loramkit plan``: what full fine-tuning, LoRA, QLoRA, LoRAM and QLoRAM cost for a model.

Parameter counts are exact (the families' geometry and the paper's kept-count rule).
Storage is given two ways: the paper's theoretical figure (4-bit = a quarter of 16-bit
for every parameter) and the real bytes of a bundle (bitsandbytes' packed weights and
block constants for the decoder projections, 16-bit embeddings, lm_head, norms, biases).
Training memory is an estimate: weights + trainable parameters with their gradients and
AdamW states + activations for the given batch, with and without gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .bundle.quantization import expected_entries
from .bundle.safetensors_io import nbytes_of
from .families import ArchSpec
from .families.geometry import LayerDims, count_parameters, expert_shapes, linear_shapes
from .families.pruning_rules import plan_layers

# Mixed-precision AdamW: bf16 weights + bf16 grads + fp32 master, m and v (full fine-tuning);
# LoRA weights train in fp32: weight + grad + m + v.
FULL_FT_BYTES_PER_PARAM = 16
LORA_BYTES_PER_PARAM = 16
METHODS = ("full fine-tuning", "LoRA", "QLoRA", "LoRAM", "QLoRAM")


@dataclass(frozen=True)
class MethodPlan:
    method: str
    parameters: int  # of the model held in memory for training
    storage_theoretical: float  # bytes: 2 per parameter, 0.5 when 4-bit (the paper's "/4")
    storage_real: int  # bytes as a bundle stores them
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


def plan(
    config: dict[str, Any],
    ratio: float,
    *,
    quant_type: str = "nf4",
    keep_first: int | None = None,
    keep_last: int | None = None,
    lora_rank: int = 8,
    seq_len: int = 512,
    batch: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict[str, Any]:
    """The five methods side by side for the model of ``config`` pruned at ``ratio``."""
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
