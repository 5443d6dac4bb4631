"""``loramkit train``: LoRA on a bundle's pruned (optionally 4-bit) model.

The step loop (data order and dropout as functions of the step, grad accumulation, DDP,
checkpoints and bitwise resume) is :mod:`loramkit.train.loop`, shared with ``loramkit align``;
here is what makes it LoRA: PEFT on the pruned model, and an adapter bound to its bundle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..bundle import Bundle
from ..bundle.fsutil import staged_dir, write_json
from ..bundle.manifest import ADAPTER_RECORD_NAME as ADAPTER_RECORD
from ..errors import LoramError
from .config import DEFAULT_TARGETS, TrainConfig
from .data import data_digest, load_examples, load_examples_with_stats
from .loop import BatchPlan, peak_memory_bytes, run_loop
from .setup import enable_activation_checkpointing, load_tokenizer, start_run

__all__ = ["BatchPlan", "adapter_record", "peak_memory_bytes", "train"]


def train(
    bundle: str | Path | Bundle,
    data: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    eval_data: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
    bundle_ref: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Train a LoRA adapter on ``bundle``'s pruned model and write it to ``out``.

    Checkpoints go to ``<out>.ckpt/`` every ``config.save_every`` steps; ``resume=True``
    continues from the newest one. ``bundle_ref`` (``org/name@commit``) is recorded so
    that ``recover`` can find a Hub bundle again in the cache. ``stop_after`` ends the run after that many optimizer
    steps as an interruption would (a checkpoint is written first): for time-sliced jobs.

    Returns:
        The run summary (steps, tokens, seconds, peak memory, losses), also stored in the
        adapter's ``loram_adapter.json``.
    """
    import peft

    from ..model.loader import load_pruned_model

    config = config or TrainConfig()
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    config.check()
    run = start_run(out, command="train", precision=config.precision, device=device, overwrite=overwrite, resume=resume,
                    seq_len=config.seq_len, micro_batch=config.micro_batch, grad_accum=config.grad_accum,
                    model_max_len=b.config.get("max_position_embeddings"), log=log)  # fmt: skip
    rank, world, dev = run.rank, run.world, run.device

    tok, pad_id = load_tokenizer(b.path)
    examples, stats = load_examples_with_stats(data, tok, config.seq_len, fmt=config.data_format)
    fmt = stats.fmt
    if rank == 0 and (stats.skipped_rows or stats.dropped_examples):
        reasons = ", ".join(f"{r} ({n})" for r, n in stats.skip_reasons.items())
        log(f"{data}: skipped {stats.skipped_rows} of {stats.rows} rows{': ' + reasons if reasons else ''}; "
            f"dropped {stats.dropped_examples} examples with no trained token within --seq-len {config.seq_len}")  # fmt: skip
    if eval_data is not None:
        held_out, _ = load_examples(eval_data, tok, config.seq_len, fmt=config.data_format)
    elif config.eval_split > 0:
        n_eval = max(1, int(len(examples) * config.eval_split))
        if n_eval >= len(examples):
            raise LoramError(f"{data}: too few examples ({len(examples)}) to hold out {config.eval_split:.0%}")
        examples, held_out = examples[:-n_eval], examples[-n_eval:]
    else:
        held_out = []

    # The frozen base (and the 4-bit layers) compute in the run's precision; LoRA weights stay fp32.
    compute = run.precision.compute_dtype
    model = load_pruned_model(b, dtype=compute, compute_dtype=compute, device=dev)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model, input_grads=True)
    # The default names the seven separate projections; a family with fused ones (Phi-3) has its own
    # names, and a mixture of experts adds its fused expert tensors as PEFT target_parameters.
    default = tuple(config.target_modules) == DEFAULT_TARGETS
    modules = b.arch.family.lora_targets if default else config.target_modules
    targets = list(modules) + (["lm_head"] if config.lm_head else [])
    expert_params = list(b.arch.family.lora_target_parameters) if default else []
    dropout = config.dropout
    if expert_params and dropout:
        log(f"LoRA dropout 0 instead of {dropout}: PEFT's LoRA on expert tensors (target_parameters) takes no dropout")
        dropout = 0.0
    lora = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=dropout, target_modules=targets,
        target_parameters=expert_params or None, use_rslora=config.rslora, task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(config.seed)  # LoRA A init
    try:
        model = peft.get_peft_model(model, lora)
    except ValueError as exc:
        raise LoramError(f"cannot apply LoRA: {exc}") from None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_batch = config.micro_batch * config.grad_accum * world
    total = config.max_steps or max(1, math.ceil(config.epochs * len(examples) / global_batch))
    identity = run.identity(config.to_json(), bundle_id=b.bundle_id, data_sha256=data_digest(data))
    r = run_loop(model, trainable, examples, held_out, pad_id, run.loop_config(total, config), device=dev, rank=rank,
                 world=world, ckpt_root=run.ckpt_root, identity=identity, resume=resume, stop_after=stop_after,
                 show_progress=show_progress, log=log)  # fmt: skip
    if r.interrupted:
        return {"steps": r.steps, "interrupted": True, "checkpoint_dir": str(run.ckpt_root)}
    summary = {
        "steps": r.steps,
        "examples": len(examples),
        "data_format": fmt,
        "skipped_rows": stats.skipped_rows,
        "tokens": r.tokens_seen,
        "seconds": round(r.seconds, 3),
        "tokens_per_second": r.tokens_per_second,
        "peak_memory_bytes": r.peak_memory_bytes,
        "final_train_loss": r.history[-1] if r.history else None,
        "eval_loss": r.final_eval["loss"] if r.final_eval else None,
        "eval_accuracy": r.final_eval["accuracy"] if r.final_eval else None,  # next-token, on the held-out data
        "eval_history": r.eval_history,
        "world_size": world,
        "device": str(dev),
        "precision": run.precision.name,
        "precision_reason": run.precision.reason,
    }
    if rank == 0:
        with staged_dir(run.out, overwrite) as tmp:
            model.save_pretrained(tmp)
            write_json(tmp / ADAPTER_RECORD, adapter_record(b, config, summary, bundle_ref))
    run.finish(config.keep_checkpoints)
    if world > 1:
        torch.distributed.barrier()
    return summary


def adapter_record(b: Bundle, config: TrainConfig, summary: dict[str, Any], bundle_ref: str | None = None) -> dict[str, Any]:
    """What ``recover`` needs to find and check the bundle, plus how the adapter was made."""
    return {
        "format": "loram-adapter",
        "version": 1,
        "bundle_id": b.bundle_id,
        "bundle": str(b.path.resolve()),
        "bundle_ref": bundle_ref,
        "base": {"name_or_path": b.base["name_or_path"], "revision": b.base.get("revision")},
        "quantization": b.manifest.get("quantization"),
        "training": {"config": config.to_json(), "summary": summary},
    }
