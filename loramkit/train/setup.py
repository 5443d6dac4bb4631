"""One run set-up for everything that trains: ``train`` (LoRA), ``align`` (full parameters)
and the demo's pre-training.

What a run needs before its first step is the same for all of them, so it is decided once,
here: the processes (rank, world) and device, the precision (from the hardware, see
:mod:`loramkit.precision`), the output and checkpoint paths, the tokenizer and pad id,
activation checkpointing through the current transformers API, the loop's configuration,
the identity a checkpoint must match to be resumed (one rule: only options that do not
change what is computed, :data:`RESUMABLE`, may differ), and checkpoint cleanup.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoramError
from ..precision import Precision, resolve_precision
from .loop import LoopConfig, dist_init, output_paths, pick_device

__all__ = ["RESUMABLE", "Run", "enable_activation_checkpointing", "load_tokenizer", "start_run"]

# Options that change only when checkpoints are written, what is kept or logged, or how
# often the held-out loss is measured: a run may be resumed with other values of these.
RESUMABLE = ("save_every", "keep_checkpoints", "log_every", "eval_every")


@dataclass(frozen=True)
class Run:
    """Where and how a training run runs; made by :func:`start_run`."""

    rank: int
    world: int
    device: torch.device
    precision: Precision
    out: Path
    ckpt_root: Path

    @property
    def main(self) -> bool:
        return self.rank == 0

    def identity(self, config: dict[str, Any], **inputs: Any) -> dict[str, Any]:
        """What a checkpoint records and a resume must match: the inputs' digests, the
        options (less :data:`RESUMABLE`) with the *resolved* precision, and the world size."""
        options = {k: v for k, v in config.items() if k not in RESUMABLE} | {"precision": self.precision.name}
        return {**inputs, "config": options, "world": self.world}

    def loop_config(self, total_steps: int, config: Any, **extra: Any) -> LoopConfig:
        """The loop's settings from a train/align config (the fields they share) plus ``extra``."""
        return LoopConfig(
            total_steps=total_steps, lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
            micro_batch=config.micro_batch, grad_accum=config.grad_accum, seed=config.seed,
            autocast_dtype=self.precision.autocast_dtype, eval_every=config.eval_every, save_every=config.save_every,
            **extra,
        )  # fmt: skip

    def finish(self, keep_checkpoints: bool) -> None:
        """After the output is written: drop the checkpoints unless asked to keep them."""
        if self.main and not keep_checkpoints:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)


def start_run(
    out: str | Path,
    *,
    command: str,
    precision: str,
    device: str | None,
    overwrite: bool,
    resume: bool,
    seq_len: int,
    micro_batch: int,
    grad_accum: int,
    model_max_len: int | None,
    log: Callable[[str], None] | None = None,
) -> Run:
    """Check the options every run shares, join the process group, pick device and precision.

    Raises:
        LoramError: an existing ``out`` without ``overwrite``, nothing to resume, bad sizes,
            a sequence length the model cannot take, an unavailable device or precision.
    """
    if micro_batch < 1 or grad_accum < 1 or seq_len < 2:
        raise LoramError("--micro-batch and --grad-accum must be at least 1, --seq-len at least 2")
    if model_max_len is not None and seq_len > model_max_len:
        raise LoramError(
            f"--seq-len {seq_len} is longer than the model takes (max_position_embeddings {model_max_len}); "
            f"use --seq-len {model_max_len} or less"
        )
    rank, world = dist_init()
    out, ckpt_root = output_paths(out, overwrite=overwrite, resume=resume, command=command)
    dev = pick_device(device, world)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoramError(f"--device {device}: CUDA is not available here; use --device cpu")
    prec = resolve_precision(precision, dev)
    if log is not None and rank == 0:
        log(f"{command}: precision {prec.describe()}, device {dev}")
    return Run(rank, world, dev, prec, out, ckpt_root)


def load_tokenizer(path: str | Path) -> tuple[Any, int]:
    """(the bundle's tokenizer, the pad id batches use: pad, else eos, else 0)."""
    from transformers import AutoTokenizer

    from ..bundle.reader import tokenizer_source

    try:
        with tokenizer_source(path) as src:  # a bundle's listed, sha256-verified files only
            tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise LoramError(
            f"{path}: no usable tokenizer ({exc}); a bundle takes its base's: re-prune a base that ships one"
        ) from None
    return tok, pad_id_of(tok)


def pad_id_of(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def enable_activation_checkpointing(model: nn.Module, *, input_grads: bool = False) -> None:
    """Recompute each decoder layer in backward (transformers' current API, non-reentrant).

    ``input_grads``: make the embeddings' output require grad, which a frozen base under
    LoRA needs so that checkpointed layers still reach the adapters' gradients.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if input_grads:
        model.enable_input_require_grads()
