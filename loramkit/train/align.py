"""``loramkit align``: continual pre-training of a bundle's pruned model (METHOD.md step 2).

Pruning removes knowledge; a short full-parameter pre-training of the pruned model on general
text brings its outputs back close to the original's, which makes adapters trained on it fit
the original better. Every weight of the pruned model trains except ``lm_head`` (and, with
tied embeddings, the input embedding, which is the same tensor), as in the paper.

The result is a new bundle with the layout of the input: the same tensor names, dtypes (the
trained fp32 master weights are rounded back to the bundle's dtype), shapes, shard files and
index file, the same index maps, config and tokenizer byte for byte, and a manifest whose
``alignment`` section (specs/bundle-v1.md 7.2) records the parent bundle, the corpus, tokens
seen, steps, hyperparameters and held-out loss before and after. ``base`` and ``index_maps``
are unchanged, so an adapter trained on the aligned bundle recovers onto the original model.

A sparse bundle (spec 7.3) loads compressed (:class:`loramkit.model.sparse.SparseLinear`):
what trains of a sparse projection is its kept values, ``W.weight.values``, the name it is
stored under; its mask is a buffer, copied byte for byte. Pruned weights have no storage, so
they stay exactly zero, and the aligned bundle keeps ``sparsity`` and ``requires``.

The step loop is :mod:`loramkit.train.loop` (shared with ``loramkit train``): the same data
order, checkpoints, bitwise resume and DDP under ``torchrun``; ``fsdp=True`` shards the model
over the processes instead (FSDP2), for a pruned model whose weights, gradients and optimizer
state do not fit one device.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import Bundle, card
from ..bundle.fsutil import staged_dir
from ..bundle.manifest import CARD_NAME
from ..bundle.safetensors_io import DTYPES, StreamingWriter
from ..bundle.writer import finalize, new_manifest
from ..errors import LoramError
from ..families.geometry import expert_part, expert_source
from .config import AlignConfig
from .corpus import Corpus, PackedBlocks, load_corpus
from .loop import ADAMW_BETAS, ADAMW_EPS, dist_init, full_tensors, run_loop
from .setup import enable_activation_checkpointing, load_tokenizer, start_run

__all__ = ["align", "heldout_indices", "trainable_parameters"]


def trainable_parameters(model: nn.Module, train_lm_head: bool = False) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on every parameter: all train but ``lm_head`` unless ``train_lm_head``.

    With tied embeddings the input embedding IS ``lm_head.weight`` (one tensor), so it is
    frozen with it. ``named_parameters`` lists a tied tensor once, under its embedding name.

    Returns:
        The trainable parameters by name, in ``named_parameters`` order.
    """
    head = model.get_output_embeddings().weight
    trainable = {}
    for name, p in model.named_parameters():
        p.requires_grad_(train_lm_head or p is not head)
        if p.requires_grad:
            trainable[name] = p
    return trainable


def heldout_indices(n: int, fraction: float) -> list[int]:
    """``max(1, floor(n * fraction))`` block indices spread evenly over ``n`` blocks.

    Spread rather than the tail, so that the held-out set samples every part of a corpus
    (the last blocks of a sorted directory are all from its last file).
    """
    k = max(1, int(n * fraction))
    if k >= n:
        raise LoramError(
            f"the corpus has {n} block(s), too few to hold out {fraction:.0%} and train on the rest; "
            "add text, lower --seq-len, or pass --eval-data"
        )
    return [int((i + 0.5) * n / k) for i in range(k)]  # distinct: n / k > 1


def _check(config: AlignConfig, world: int) -> None:
    config.check()
    if config.fsdp and world < 2:
        raise LoramError("--fsdp shards the model over several processes; launch with torchrun --nproc_per_node N (N >= 2)")


def align(
    bundle: str | Path | Bundle,
    data: str | Path,
    out: str | Path,
    config: AlignConfig | None = None,
    *,
    description: str = "",
    eval_data: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Continually pre-train ``bundle``'s pruned model on ``data`` and write the aligned bundle to ``out``.

    Checkpoints go to ``<out>.ckpt/`` every ``config.save_every`` steps; ``resume=True``
    continues from the newest one (and gives bitwise the bundle an uninterrupted run gives).
    ``stop_after`` ends the run after that many steps as an interruption would.

    Args:
        data: the corpus: a ``.txt`` / ``.jsonl`` file or a directory of them (see
            :mod:`loramkit.train.corpus`).
        description: free text recorded as ``alignment.corpus.description`` (e.g. the sources and mix).
        eval_data: a held-out corpus; without it ``config.eval_split`` of the blocks is held out.

    Returns:
        The run summary (steps, tokens, seconds, tokens/s, peak memory, held-out losses) and,
        on rank 0, the new bundle's ``manifest``.

    Raises:
        LoramError: a 4-bit bundle (align the 16-bit one, then quantize), ``out`` exists
            without ``overwrite``, a corpus without usable text, bad options, or a checkpoint
            of another run. Nothing is written then.

    Example:
        >>> align("llama-loram-0.85", "fineweb-sample/", "llama-loram-0.85-aligned",
        ...       AlignConfig(tokens=100_000_000), description="FineWeb:OpenWebMath 2:1")["heldout_loss_after"]
    """
    from ..model.loader import load_pruned_model

    config = config or AlignConfig()
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    q = b.manifest.get("quantization")
    if q is not None:
        raise LoramError(
            f"{b.path} is a 4-bit ({q['quant_type']}) bundle, which cannot be aligned: align the 16-bit bundle "
            "it was quantized from first, then quantize the aligned bundle (loramkit quantize)"
        )
    if Path(out).resolve() == b.path.resolve():
        raise LoramError(f"{out} is the bundle being aligned; write the aligned bundle to another directory")
    _check(config, dist_init()[1])
    run = start_run(out, command="align", precision=config.precision, device=device, overwrite=overwrite, resume=resume,
                    seq_len=config.seq_len, micro_batch=config.micro_batch, grad_accum=config.grad_accum,
                    model_max_len=b.config.get("max_position_embeddings"), log=log)  # fmt: skip
    rank, world, dev, out = run.rank, run.world, run.device, run.out

    tok, pad_id = load_tokenizer(b.path)
    corpus = load_corpus(data, tok, config.seq_len)
    blocks, held_out, heldout_info = _split(corpus, eval_data, tok, config)
    global_batch = config.micro_batch * config.grad_accum * world
    batch_tokens = global_batch * config.seq_len
    if config.max_steps is not None:
        total = config.max_steps
    elif config.tokens is not None:
        total = math.ceil(config.tokens / batch_tokens)
    else:
        total = max(1, math.ceil(len(blocks) / global_batch))  # one pass over the corpus
    if rank == 0:
        skipped = f", {corpus.skipped_rows} rows without text skipped" if corpus.skipped_rows else ""
        log(f"{data}: {len(corpus.files)} file(s), {corpus.documents:,} documents, {corpus.num_tokens:,} tokens{skipped}; "
            f"{len(blocks):,} blocks of {config.seq_len} to train on, {len(held_out):,} held out")  # fmt: skip
        log(f"align: {total:,} steps of {global_batch} x {config.seq_len} = {batch_tokens:,} tokens "
            f"({total * batch_tokens:,} tokens, {total * global_batch / len(blocks):.2f} passes over the corpus)")  # fmt: skip
        if config.warmup_steps >= total:
            log(f"note: --warmup-steps {config.warmup_steps} is not shorter than the run ({total} steps); "
                "the learning rate never reaches --lr")  # fmt: skip
        if not held_out:
            log("note: nothing is held out (--eval-split 0 and no --eval-data): the manifest records no held-out loss")

    # Master weights in fp32 under mixed precision (bf16 only when asked for pure bf16).
    dtype = torch.bfloat16 if run.precision.name == "bf16" else torch.float32
    # Under FSDP every process loads the model on the CPU and keeps only its shards on the device.
    model = load_pruned_model(b, dtype=dtype, device="cpu" if config.fsdp else dev)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    trainable = trainable_parameters(model, config.train_lm_head)
    loop = run.loop_config(total, config, max_grad_norm=config.max_grad_norm or None, eval_at_start=True,
                           log_every=config.log_every, fsdp=config.fsdp, label="align")  # fmt: skip
    identity = run.identity(config.to_json(), bundle_id=b.bundle_id, corpus_sha256=corpus.sha256, heldout=heldout_info)
    r = run_loop(model, trainable, blocks, held_out, pad_id, loop, device=dev, rank=rank, world=world,
                 ckpt_root=run.ckpt_root, identity=identity, resume=resume, stop_after=stop_after,
                 show_progress=show_progress, log=log)  # fmt: skip
    if r.interrupted:
        return {"steps": r.steps, "interrupted": True, "checkpoint_dir": str(run.ckpt_root)}

    before = next((loss for step, loss in r.eval_history if step == 0), None) if held_out else None
    after = r.final_eval["loss"] if r.final_eval else None
    if not all(math.isfinite(x) for x in (*r.history[-1:], *(x for x in (before, after) if x is not None))):
        raise LoramError(
            f"training diverged (last training loss {r.history[-1] if r.history else None}, held-out loss "
            f"{before} -> {after}); nothing was written: lower --lr or use --precision bf16-mixed / fp32"
        )
    alignment = {
        "parent_bundle_id": b.bundle_id,
        "corpus": {
            "sha256": corpus.sha256,
            "description": description,
            "num_tokens": corpus.num_tokens,
            "files": len(corpus.files),
            "documents": corpus.documents,
        },
        "tokens_seen": r.tokens_seen,
        "steps": r.steps,
        "hyperparameters": {
            "optimizer": "adamw",
            "lr": config.lr,
            "betas": list(ADAMW_BETAS),
            "eps": ADAMW_EPS,
            "weight_decay": config.weight_decay,
            "schedule": "cosine",
            "warmup_steps": config.warmup_steps,
            "max_grad_norm": config.max_grad_norm or None,
            "seq_len": config.seq_len,
            "micro_batch": config.micro_batch,
            "grad_accum": config.grad_accum,
            "world_size": world,
            "global_batch_tokens": batch_tokens,
            "precision": run.precision.name,
            "train_lm_head": config.train_lm_head,
            "seed": config.seed,
            "distributed": ("fsdp" if config.fsdp else "ddp") if world > 1 else None,
        },
        "heldout_loss": None
        if before is None
        else {
            "before": round(before, 6),
            "after": round(after, 6),
            "num_tokens": r.final_eval["tokens"],
            **heldout_info,
        },  # fmt: skip
    }
    if b.manifest.get("alignment") is not None:
        alignment["previous"] = b.manifest["alignment"]  # aligning an aligned bundle keeps the history
    summary = {
        "parent_bundle_id": b.bundle_id,
        "steps": r.steps,
        "tokens_seen": r.tokens_seen,
        "seconds": round(r.seconds, 3),
        "tokens_per_second": r.tokens_per_second,
        "peak_memory_bytes": r.peak_memory_bytes,
        "final_train_loss": r.history[-1] if r.history else None,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "eval_history": r.eval_history,
        "corpus": alignment["corpus"] | {"blocks": len(blocks), "heldout_blocks": len(held_out)},
        "world_size": world,
        "device": str(dev),
        "precision": run.precision.name,
        "precision_reason": run.precision.reason,
    }

    # Rank 0 writes; under FSDP the others take part in gathering each trained tensor.
    params = dict(r.model.named_parameters())
    with b.weights() as ckpt:
        order = _tensor_order(b, ckpt)
    # A mixture of experts stores each expert's weights apart; in memory they are slices of fused tensors.
    source = {n: expert_source(b.arch, n) or (n, None, None) for n in order}
    missing = sorted(set(trainable) - {src for src, _, _ in source.values()})
    if missing:  # a bug, never a user error: every parameter is stored under its name
        raise RuntimeError(f"trained parameter {missing[0]} is not in the bundle's weight files")
    stored_trained = [n for n in order if source[n][0] in trainable]
    gathered = full_tensors(params, list(dict.fromkeys(source[n][0] for n in stored_trained)))
    if rank == 0:
        per_stored = _stored_tensors(gathered, stored_trained, source)
        summary["manifest"] = _write_bundle(b, out, overwrite, set(stored_trained), per_stored, alignment)
        summary["bundle_id"] = summary["manifest"]["bundle_id"]
    elif config.fsdp:
        for _ in gathered:
            pass
    run.finish(config.keep_checkpoints)
    if world > 1:
        torch.distributed.barrier()
    return summary


def _split(
    corpus: Corpus, eval_data: str | Path | None, tok: Any, config: AlignConfig
) -> tuple[PackedBlocks, PackedBlocks, dict[str, Any]]:
    """(training blocks, held-out blocks, what the manifest says about the held-out set)."""
    if eval_data is not None:
        held = load_corpus(eval_data, tok, config.seq_len)
        return corpus.blocks, held.blocks, {"corpus_sha256": held.sha256}
    if config.eval_split == 0:
        return corpus.blocks, corpus.blocks[:0], {}
    n = len(corpus.blocks)
    held = heldout_indices(n, config.eval_split)
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set]
    return corpus.blocks.select(train), corpus.blocks.select(held), {"split": config.eval_split}


def _stored_tensors(
    gathered: Iterator[tuple[str, torch.Tensor]], names: list[str], source: dict[str, tuple[str, int | None, str | None]]
) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """``(stored name, tensor)`` in ``names`` order from the gathered parameters (an expert's slice of a fused one).

    A fused expert tensor is held until the last of its experts' weights is written.
    """
    pending = {}
    for src in (source[n][0] for n in names):
        pending[src] = pending.get(src, 0) + 1
    held: dict[str, torch.Tensor] = {}
    for name in names:
        src, expert, role = source[name]
        while src not in held:
            got, tensor = next(gathered)
            held[got] = tensor
        yield name, held[src] if expert is None else expert_part(held[src], expert, role)
        pending[src] -= 1
        if not pending[src]:
            del held[src]


def _tensor_order(b: Bundle, ckpt: Any) -> list[str]:
    """Every stored tensor, file by file (``weights.files`` order), in each file's data order."""
    order = []
    for file in b.manifest["weights"]["files"]:
        tensors = ckpt.readers[file].tensors
        order += sorted(tensors, key=lambda n: tensors[n].start)
    return order


def _write_bundle(
    b: Bundle, out: Path, overwrite: bool, trained_names: set[str], trained: Iterator[tuple[str, torch.Tensor]],
    alignment: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The aligned bundle: ``b``'s layout with the trained tensors in place, written atomically.

    ``trained`` yields ``(name, tensor)`` for ``trained_names`` in the order they are stored.
    """
    m = b.manifest
    weight_files = set(m["weights"]["files"])
    for rel in m["files"]:  # everything copied below is what the manifest names
        if rel != CARD_NAME and rel not in weight_files:
            b.verify_file(rel)
    from ..bundle.reader import check_written

    with b.weights() as ckpt, staged_dir(out, overwrite, inputs=[b.path], check=check_written) as tmp:
        sha: dict[str, str] = {}
        for file in m["weights"]["files"]:
            reader = ckpt.readers[file]
            names = sorted(reader.tensors, key=lambda n: reader.tensors[n].start)
            entries = [(n, reader.tensors[n].dtype, reader.tensors[n].shape) for n in names]
            writer = StreamingWriter(tmp / file, entries, reader.metadata or None)
            try:
                for name, dtype, _ in entries:
                    if name in trained_names:
                        got, tensor = next(trained)
                        if got != name:  # a bug: the gather order is the write order
                            raise RuntimeError(f"expected {name}, gathered {got}")
                        writer.write(name, tensor.to(device="cpu", dtype=DTYPES[dtype]))
                    else:  # frozen: byte for byte
                        writer.copy_from(reader, name)
                sha[file] = writer.close()
            except BaseException:
                writer.abort()
                raise
        for rel in m["files"]:  # index maps, index file, config, tokenizer: byte for byte
            if rel != CARD_NAME and rel not in weight_files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(b.path / rel, tmp / rel)
        keep = {
            k: v for k, v in m.items() if k not in ("format", "format_version", "created_by", "created_at", "bundle_id", "files")
        }
        manifest = new_manifest(**(keep | {"alignment": alignment}))
        (tmp / CARD_NAME).write_text(card.render(manifest), encoding="utf-8")
        return finalize(tmp, manifest, sha)
