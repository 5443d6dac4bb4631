"""What a training run is told: one dataclass, every field a CLI option."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("bf16-mixed", "bf16", "fp32")


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
    # bf16-mixed: fp32 LoRA weights, bf16 autocast (the default; fast on CPUs with AVX512-BF16
    # and on GPUs); bf16: everything bf16; fp32: no autocast.
    precision: str = "bf16-mixed"
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
