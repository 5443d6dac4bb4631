"""What a training run is told: one dataclass, every field a CLI option.

Each config checks its own values (:meth:`TrainConfig.check`), so the CLI and the Python API
refuse the same things with the same one-line message: a NaN or infinite learning rate would
otherwise train to NaN and exit 0, and ``max_steps=0`` would mean "no limit".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LoramError


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(config: Any, rules: dict[str, tuple[str, Any]]) -> None:
    """``rules``: field -> (what it must be, predicate on the value); the first failure raises."""
    for name, (what, ok) in rules.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not ok(value):
            raise LoramError(f"{_option(name)} must be {what}, got {value!r}")


def _int(lo: int) -> Any:
    return lambda v: isinstance(v, int) and v >= lo


def _real(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = True) -> Any:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def _optional(ok: Any) -> Any:
    return lambda v: v is None or ok(v)


# Checks both configs share: the step loop's options.
_LOOP_RULES = {
    "lr": ("a finite number > 0", _real(0, lo_open=True)),
    "warmup_steps": ("an integer >= 0", _int(0)),
    "weight_decay": ("a finite number >= 0", _real(0)),
    "max_steps": ("an integer >= 1 (or unset)", _optional(_int(1))),
    "micro_batch": ("an integer >= 1", _int(1)),
    "grad_accum": ("an integer >= 1", _int(1)),
    "seq_len": ("an integer >= 2", _int(2)),
    "seed": ("an integer >= 0", _int(0)),
    "eval_split": ("a fraction in [0, 1)", _real(0, 1)),
    "eval_every": ("an integer >= 0", _int(0)),
    "save_every": ("an integer >= 0", _int(0)),
}

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

    def check(self) -> None:
        """Raise :class:`LoramError` naming the first option out of range."""
        _require(self, {
            "rank": ("an integer >= 1", _int(1)),
            "alpha": ("a finite number > 0", _real(0, lo_open=True)),
            "dropout": ("a fraction in [0, 1)", _real(0, 1)),
            "epochs": ("a finite number > 0", _real(0, lo_open=True)),
            **_LOOP_RULES,
        })  # fmt: skip
        if not self.target_modules:
            raise LoramError("--target must name at least one module")

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

    def check(self) -> None:
        """Raise :class:`LoramError` naming the first option out of range."""
        _require(self, {
            "max_grad_norm": ("a finite number >= 0 (0: no clipping)", _optional(_real(0))),
            "tokens": ("an integer >= 1 (or unset)", _optional(_int(1))),
            "log_every": ("an integer >= 0", _int(0)),
            **_LOOP_RULES,
        })  # fmt: skip
        if self.tokens is not None and self.max_steps is not None:
            raise LoramError("pass --tokens or --max-steps, not both")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
