"""What a training run is told: one dataclass, every field a CLI option."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """LoRA training hyperparameters. Defaults follow common LoRA practice for 7B-70B models."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lm_head: bool = False  # also adapt lm_head (never pruned: passes through recovery)
    rslora: bool = False
    lr: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    # auto (bf16-mixed where the device computes bf16 natively, else fp32, or fp16-mixed on
    # CUDA without bf16; see loramkit.precision) | bf16-mixed: fp32 LoRA weights, frozen base
    # and 4-bit layers in bf16, bf16 autocast | fp16-mixed | bf16: everything bf16 | fp32.
    precision: str = "auto"
    seed: int = 0
    eval_split: float = 0.0  # fraction of the data held out when no eval file is given
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: bool = False
    data_format: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class AlignConfig:
    """Continual pre-training of a pruned model (METHOD.md step 2), full-parameter.

    Defaults follow the paper where it says (lr 5e-5, cosine, 100 warmup steps, sequences
    of 512; its global batch was 128 x 512 tokens: set ``micro_batch * grad_accum * processes``).
    """

    lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    tokens: int | None = None  # token budget: steps = ceil(tokens / global batch tokens)
    max_steps: int | None = None  # instead of tokens; neither: one pass over the corpus
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    # lm_head stays frozen, as in the paper (and with tied embeddings the input embedding,
    # which is the same tensor); True trains it too.
    train_lm_head: bool = False
    gradient_checkpointing: bool = False
    # auto (as for TrainConfig) | bf16-mixed: fp32 master weights, bf16 autocast | fp16-mixed |
    # bf16: weights, gradients and optimizer state in bf16 (small updates may round away) | fp32.
    precision: str = "auto"
    seed: int = 0
    eval_split: float = 0.01  # fraction of the corpus's blocks held out (at least one) without eval data
    eval_every: int = 0  # 0: before and after only
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    log_every: int = 50  # progress line every N steps when no progress bar is shown (0: never)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
