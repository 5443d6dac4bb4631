"""The optimizer-step loop shared by ``loramkit train`` (LoRA) and ``loramkit align`` (full parameters).

One loop, the same on one process and under ``torchrun`` / ``accelerate launch`` (DDP, or FSDP
when asked): every optimizer step ``s`` reads the global batch at positions ``[s*G, (s+1)*G)``
of an endless stream of seeded per-epoch permutations, each rank taking its own micro-batches,
and reseeds dropout from ``(seed, s, rank)``. The data position and the RNG are thus functions
of the step number, and a resumed run replays an uninterrupted one exactly: a checkpoint holds
the trained tensors, the optimizer state and the step, nothing else is needed.

What the callers differ in is passed in: the model, which of its parameters train (by name),
the examples, and what a checkpoint must match to be resumed (``identity``).

Example::

    rank, world = dist_init()
    result = run_loop(model, {n: p for n, p in model.named_parameters() if p.requires_grad},
                      examples, held_out, pad_id, LoopConfig(total_steps=100, lr=1e-4),
                      device=torch.device("cpu"), rank=rank, world=world,
                      ckpt_root=Path("out.ckpt"), identity={"data": digest})
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import progress
from ..errors import LoramError
from . import checkpoint
from .data import Example, collate
from .metrics import evaluate

__all__ = [
    "BatchPlan",
    "LoopConfig",
    "LoopResult",
    "dist_init",
    "full_tensors",
    "lr_factor",
    "peak_memory_bytes",
    "pick_device",
    "run_loop",
]

ADAMW_BETAS = (0.9, 0.999)  # torch's defaults, recorded with aligned bundles
ADAMW_EPS = 1e-8


def dist_init() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world
    return 0, 1


def pick_device(device: str | None, world: int) -> torch.device:
    """The requested device, CUDA when present, and under torchrun each rank's own GPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


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

    @lru_cache(maxsize=4)  # noqa: B019 - a plan lives as long as its run
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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to 0 over ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


@dataclass(frozen=True)
class LoopConfig:
    """How the loop steps; the caller decides what trains and on what data."""

    total_steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    micro_batch: int = 4
    grad_accum: int = 1
    seed: int = 0
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast around the forward pass (params keep their dtype)
    max_grad_norm: float | None = None  # clip the global gradient norm (after the all-reduce)
    eval_every: int = 0  # held-out loss every N steps (0: at the end only)
    eval_at_start: bool = False  # also before the first step (kept across a resume)
    save_every: int = 0  # checkpoint every N steps (0: only when interrupted by stop_after)
    log_every: int = 0  # a progress line every N steps when no progress bar is shown
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    label: str = "training"


@dataclass
class LoopResult:
    steps: int
    tokens_seen: int  # over the whole run, resumed parts included
    history: list[float]  # training loss of every step
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss); step 0: before
    final_eval: dict[str, Any] | None = None
    seconds: float = 0.0  # this process's part of the run (after a resume: since the resume)
    tokens_per_second: float | None = None
    peak_memory_bytes: int = 0
    interrupted: bool = False
    model: nn.Module | None = None  # the trained model (sharded in place under FSDP)


def _shard(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2: each decoder layer its own group, embeddings, final norm and lm_head in the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh, and the shards fully_shard moves there, use the current GPU
    mesh = init_device_mesh(device.type, (world,))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise LoramError(f"--fsdp: {type(model).__name__} has no model.layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_tensors(params: dict[str, torch.Tensor], names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` one at a time, in ``names`` order; every rank must iterate alike.

    Under FSDP each tensor is gathered from its shards (a collective), so only one whole
    tensor exists at a time; otherwise the parameter itself is returned.
    """
    for name in names:
        t = params[name].detach()
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t)  # a DTensor shard, or whole


def _checkpoint_tensors(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in full_tensors(trainable, list(trainable))}


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def _restore(
    model: nn.Module, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor], opt_state: dict[str, Any], fsdp: bool,
) -> None:  # fmt: skip
    if sorted(tensors) != sorted(trainable):
        raise LoramError("checkpoint holds other tensors than this run trains; delete it to start over")
    if not fsdp:
        for name, p in trainable.items():
            p.copy_(tensors[name])
        optimizer.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    for group in optimizer.param_groups:  # the saved groups carry the scheduler's key; the loader maps keys 1:1
        group.setdefault("initial_lr", group["lr"])
    set_model_state_dict(model, tensors, options=options)
    set_optimizer_state_dict(model, optimizer, opt_state, options=options)


def run_loop(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    examples: Sequence[Example],
    held_out: Sequence[Example],
    pad_id: int,
    cfg: LoopConfig,
    *,
    device: torch.device,
    rank: int,
    world: int,
    ckpt_root: Path,
    identity: dict[str, Any],
    resume: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Train ``trainable`` (a subset of ``model``'s parameters, by name) for ``cfg.total_steps`` steps.

    AdamW over ``trainable`` with linear warmup then cosine decay to 0; ``grad_accum``
    micro-batches per step, gradients all-reduced once per step (DDP) or reduce-scattered
    (FSDP). Checkpoints go to ``ckpt_root`` every ``cfg.save_every`` steps, from rank 0;
    ``resume=True`` continues from the newest one, whose ``identity`` must equal this run's.
    ``stop_after`` ends the run after that many steps as an interruption would (a checkpoint
    is written first).

    Returns:
        A :class:`LoopResult`; ``result.model`` is the model to save (under FSDP its
        parameters are sharded: read them with :func:`full_tensors` on every rank).

    Raises:
        LoramError: a checkpoint made with another ``identity``, or unreadable.
    """
    names = list(trainable)
    if cfg.fsdp:
        _shard(model, device, world)
        params = dict(model.named_parameters())
        trainable = {n: params[n] for n in names}  # FSDP replaced them with sharded ones
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=ADAMW_BETAS, eps=ADAMW_EPS)  # fmt: skip
    plan = BatchPlan(len(examples), cfg.micro_batch, cfg.grad_accum, world, cfg.seed)
    total = cfg.total_steps

    step, tokens_seen, history, eval_losses = 0, 0, [], []
    if resume:
        tensors, opt_state, meta = checkpoint.load(checkpoint.latest(ckpt_root))
        changed = [k for k in identity if meta.get(k) != identity[k]]
        if changed:
            raise LoramError(
                f"{ckpt_root}: checkpoint was made with a different {', '.join(changed)}; "
                "resume with the same bundle, data and options, or delete it to start over"
            )
        _restore(model, trainable, optimizer, tensors, opt_state, cfg.fsdp)
        del tensors, opt_state
        step, tokens_seen, history = meta["step"], meta["tokens_seen"], meta["history"]
        eval_losses = [tuple(e) for e in meta.get("eval_history", [])]
        if rank == 0:
            log(f"resumed from step {step} of {total}")

    # After a resume the optimizer carries initial_lr, and the schedule picks up at `step`.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total), last_epoch=step - 1)
    ddp = model
    if world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are constants every rank loads alike (rotary tables, a sparse bundle's masks): broadcasting
        # them before every forward, DDP's default, would copy every mask each micro-batch.
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def held_out_loss() -> float:
        return evaluate(model, held_out, pad_id, cfg.micro_batch, cfg.autocast_dtype)["loss"]

    # fp16 autocast: scale the loss so small gradients do not underflow (bf16 has fp32's range).
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.autocast_dtype == torch.float16)

    if held_out and cfg.eval_at_start and step == 0:
        eval_losses.append((0, held_out_loss()))
    show = show_progress and rank == 0
    log_lines = cfg.log_every > 0 and rank == 0 and not progress.enabled(show_progress)
    t0, start_tokens = time.perf_counter(), tokens_seen
    model.train()
    with progress.training(total, step, show=show) as bar:
        while step < total:
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout, replayable
            step_loss, step_tokens = 0.0, 0
            micro = plan.micro_batches(step, rank)
            for k, indices in enumerate(micro):
                batch = {key: t.to(device) for key, t in collate([examples[i] for i in indices], pad_id).items()}
                last = k == len(micro) - 1
                # Gradients are all-reduced (DDP) / reduce-scattered (FSDP) once per step, on the last micro-batch.
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last)
                with ddp.no_sync() if world > 1 and not cfg.fsdp and not last else nullcontext():
                    with torch.autocast(
                        device.type, dtype=cfg.autocast_dtype or torch.bfloat16, enabled=cfg.autocast_dtype is not None
                    ):
                        loss = ddp(**batch).loss / len(micro)
                    scaler.scale(loss).backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            scaler.unscale_(optimizer)  # no-op unless fp16
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            scaler.step(optimizer)  # optimizer.step(), skipped by fp16's scaler on inf/nan gradients
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens *= world  # every rank processes the same number of micro-batches
            tokens_seen += step_tokens
            history.append(round(step_loss, 6))
            tps = (tokens_seen - start_tokens) / max(1e-9, time.perf_counter() - t0)
            bar(step, step_loss, scheduler.get_last_lr()[0], tps)
            if log_lines and (step % cfg.log_every == 0 or step == total):
                log(f"{cfg.label}: step {step}/{total}  loss {step_loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                    f"{tokens_seen:,} tokens  {tps:,.0f} tokens/s")  # fmt: skip
            if held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                eval_losses.append((step, held_out_loss()))
                if log_lines:
                    log(f"{cfg.label}: step {step}/{total}  held-out loss {eval_losses[-1][1]:.4f}")
            interrupted = stop_after is not None and step >= stop_after and step < total
            if cfg.save_every and (step % cfg.save_every == 0 or interrupted) and step < total:
                if rank == 0 or cfg.fsdp:  # gathering shards is a collective: every rank takes part
                    tensors = _checkpoint_tensors(trainable)
                    opt_state = _optimizer_state(model, optimizer, cfg.fsdp)
                if rank == 0:
                    state = {**identity, "tokens_seen": tokens_seen, "history": history, "eval_history": eval_losses}
                    checkpoint.save(ckpt_root, step, tensors, opt_state, state)
            if interrupted:
                if world > 1:
                    torch.distributed.barrier()
                return LoopResult(step, tokens_seen, history, eval_losses, interrupted=True, model=model)
    seconds = time.perf_counter() - t0
    final_eval = evaluate(model, held_out, pad_id, cfg.micro_batch, cfg.autocast_dtype) if held_out else None
    done = tokens_seen - start_tokens
    return LoopResult(
        steps=step,
        tokens_seen=tokens_seen,
        history=history,
        eval_history=eval_losses,
        final_eval=final_eval,
        seconds=seconds,
        tokens_per_second=round(done / seconds, 1) if seconds > 0 else None,
        peak_memory_bytes=peak_memory_bytes(device),
        model=model,
    )


def output_paths(out: str | Path, *, overwrite: bool, resume: bool, command: str) -> tuple[Path, Path]:
    """(OUT, OUT.ckpt/): refuses an existing OUT, and a resume with no checkpoint to resume from."""
    from ..bundle.fsutil import refuse_existing
    from ..errors import LoramError
    from . import checkpoint

    out = Path(out)
    ckpt_root = out.with_name(out.name + ".ckpt")
    refuse_existing(out, overwrite)
    if resume and checkpoint.latest(ckpt_root) is None:
        raise LoramError(f"nothing to resume: no checkpoint in {ckpt_root} ({command} with --save-every N to make them)")
    return out, ckpt_root
