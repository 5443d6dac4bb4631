"""``loramkit train``: LoRA on a bundle's pruned (optionally 4-bit) model.

One loop, the same on one process and under ``torchrun`` / ``accelerate launch`` (DDP):
every optimizer step ``s`` reads the global batch at positions ``[s*G, (s+1)*G)`` of an
endless stream of seeded per-epoch permutations, each rank taking its own micro-batches,
and reseeds dropout from ``(seed, s, rank)``. The data position and the RNG are thus
functions of the step number, and a resumed run replays an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..bundle import Bundle
from ..bundle.fsutil import staged_dir, write_json
from ..bundle.manifest import ADAPTER_RECORD_NAME as ADAPTER_RECORD
from ..errors import LoramError
from . import checkpoint
from .config import PRECISIONS, TrainConfig
from .data import collate, data_digest, load_examples, load_examples_with_stats
from .metrics import evaluate

def _dist() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world
    return 0, 1


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated on GPU, VmHWM (peak RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class BatchPlan:
    """Which examples each rank uses at each step: a pure function of (seed, step, rank)."""

    def __init__(self, n: int, micro_batch: int, grad_accum: int, world: int, seed: int):
        self.n, self.mb, self.accum, self.world, self.seed = n, micro_batch, grad_accum, world, seed
        self.global_batch = micro_batch * grad_accum * world

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """``grad_accum`` lists of ``micro_batch`` example indices for ``rank`` at ``step``."""
        out, pos = [], step * self.global_batch
        while len(out) < self.global_batch:
            epoch, off = divmod(pos, self.n)
            take = min(self.n - off, self.global_batch - len(out))
            out += self._perm(epoch)[off : off + take]
            pos += take
        return [out[(k * self.world + rank) * self.mb : (k * self.world + rank + 1) * self.mb] for k in range(self.accum)]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to 0 over ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


def _check(config: TrainConfig, model_max_len: int | None) -> None:
    if config.precision not in PRECISIONS:
        raise LoramError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.rank < 1 or config.micro_batch < 1 or config.grad_accum < 1 or config.seq_len < 2:
        raise LoramError("rank, micro-batch, grad-accum must be >= 1 and seq-len >= 2")
    if model_max_len is not None and config.seq_len > model_max_len:
        raise LoramError(
            f"--seq-len {config.seq_len} is longer than the model takes (max_position_embeddings {model_max_len}); "
            f"use --seq-len {model_max_len} or less"
        )
    if not 0 <= config.eval_split < 1:
        raise LoramError("--eval-split must be in [0, 1)")


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
    log=print,
) -> dict[str, Any]:
    """Train a LoRA adapter on ``bundle``'s pruned model and write it to ``out``.

    Checkpoints go to ``<out>.ckpt/`` every ``config.save_every`` steps; ``resume=True``
    continues from the newest one. ``stop_after`` ends the run after that many optimizer
    steps as an interruption would (a checkpoint is written first): for time-sliced jobs.

    Returns:
        The run summary (steps, tokens, seconds, peak memory, losses), also stored in the
        adapter's ``loram_adapter.json``.
    """
    import peft
    from transformers import AutoTokenizer

    from ..model.loader import load_pruned_model

    config = config or TrainConfig()
    rank, world = _dist()
    out = Path(out)
    ckpt_root = out.with_name(out.name + ".ckpt")
    if out.exists() and not overwrite:
        raise LoramError(f"{out} already exists; choose another output or pass --overwrite")
    if resume and checkpoint.latest(ckpt_root) is None:
        raise LoramError(f"nothing to resume: no checkpoint in {ckpt_root} (train with --save-every N to make them)")
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    _check(config, b.config.get("max_position_embeddings"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    try:
        tok = AutoTokenizer.from_pretrained(b.path)
    except (OSError, ValueError) as exc:
        raise LoramError(f"{b.path}: the bundle has no usable tokenizer ({exc}); re-prune a base that ships one") from None
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
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    autocast = config.precision == "bf16-mixed"
    dtype = torch.float32 if config.precision == "fp32" else torch.bfloat16
    model = load_pruned_model(b, dtype=dtype, device=dev)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = list(config.target_modules) + (["lm_head"] if config.lm_head else [])
    lora = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        use_rslora=config.rslora, task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(config.seed)  # LoRA A init
    try:
        model = peft.get_peft_model(model, lora)
    except ValueError as exc:
        raise LoramError(f"cannot apply LoRA: {exc}") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    plan = BatchPlan(len(examples), config.micro_batch, config.grad_accum, world, config.seed)
    total = config.max_steps or max(1, math.ceil(config.epochs * len(examples) / plan.global_batch))

    identity = {"bundle_id": b.bundle_id, "data_sha256": data_digest(data), "config": config.to_json(), "world": world}
    step, tokens_seen, history = 0, 0, []
    if resume:
        lora_state, opt_state, meta = checkpoint.load(checkpoint.latest(ckpt_root))
        changed = [k for k in identity if meta.get(k) != identity[k]]
        if changed:
            raise LoramError(
                f"{ckpt_root}: checkpoint was made with a different {', '.join(changed)}; "
                "resume with the same bundle, data and options, or delete it to start over"
            )
        peft.set_peft_model_state_dict(model, lora_state)
        optimizer.load_state_dict(opt_state)
        step, tokens_seen, history = meta["step"], meta["tokens_seen"], meta["history"]
        if rank == 0:
            log(f"resumed from step {step} of {total}")

    # After a resume the optimizer carries initial_lr, and the schedule picks up at `step`.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, total), last_epoch=step - 1
    )
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    eval_losses: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    model.train()
    with progress.training(total, step, show=show_progress and rank == 0) as bar:
        while step < total:
            torch.manual_seed(config.seed * 1_000_003 + step * world + rank)  # dropout, replayable
            step_loss, step_tokens = 0.0, 0
            micro = plan.micro_batches(step, rank)
            for k, indices in enumerate(micro):
                batch = {key: t.to(dev) for key, t in collate([examples[i] for i in indices], pad_id).items()}
                last = k == len(micro) - 1
                # Gradients are all-reduced once per step, on the last micro-batch.
                with ddp.no_sync() if world > 1 and not last else nullcontext():
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = ddp(**batch).loss / len(micro)
                    loss.backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens *= world  # every rank processes the same number of micro-batches
            tokens_seen += step_tokens
            history.append(round(step_loss, 6))
            bar(step, step_loss, scheduler.get_last_lr()[0], tokens_seen / max(1e-9, time.perf_counter() - t0))
            if held_out and config.eval_every and step % config.eval_every == 0 and step < total:
                eval_losses.append((step, evaluate(model, held_out, pad_id, config.micro_batch, autocast)["loss"]))
            interrupted = stop_after is not None and step >= stop_after and step < total
            if config.save_every and rank == 0 and (step % config.save_every == 0 or interrupted) and step < total:
                state = {**identity, "tokens_seen": tokens_seen, "history": history}
                checkpoint.save(ckpt_root, step, peft.get_peft_model_state_dict(model), optimizer, state)
            if interrupted:
                if world > 1:
                    torch.distributed.barrier()
                return {"steps": step, "interrupted": True, "checkpoint_dir": str(ckpt_root)}
    seconds = time.perf_counter() - t0
    final_eval = evaluate(model, held_out, pad_id, config.micro_batch, autocast) if held_out else None
    peak = peak_memory_bytes(dev)
    summary = {
        "steps": step,
        "examples": len(examples),
        "data_format": fmt,
        "skipped_rows": stats.skipped_rows,
        "tokens": tokens_seen,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens_seen / seconds, 1) if seconds > 0 else None,
        "peak_memory_bytes": peak,
        "final_train_loss": history[-1] if history else None,
        "eval_loss": final_eval["loss"] if final_eval else None,
        "eval_history": eval_losses,
        "world_size": world,
        "device": str(dev),
    }
    if rank == 0:
        with staged_dir(out, overwrite) as tmp:
            model.save_pretrained(tmp)
            write_json(tmp / ADAPTER_RECORD, adapter_record(b, config, summary))
        if not config.keep_checkpoints:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return summary


def adapter_record(b: Bundle, config: TrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """What ``recover`` needs to find and check the bundle, plus how the adapter was made."""
    return {
        "format": "loram-adapter",
        "version": 1,
        "bundle_id": b.bundle_id,
        "bundle": str(b.path.resolve()),
        "base": {"name_or_path": b.base["name_or_path"], "revision": b.base.get("revision")},
        "quantization": b.manifest.get("quantization"),
        "training": {"config": config.to_json(), "summary": summary},
    }
