"""loramkit align BUNDLE --data CORPUS --out BUNDLE2 [--json]"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..precision import PrecisionChoice
from ._common import (
    AsJson,
    Device,
    Endpoint,
    KeepCheckpoints,
    Overwrite,
    Precision,
    Resume,
    SaveEvery,
    Token,
    console,
    err,
    print_json,
)


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align_cmd(
        bundle: Annotated[str, typer.Argument(help="LoRAM bundle (16-bit) to align: directory or Hub repo id.")],
        data: Annotated[Path, typer.Option(help='Corpus: a .txt, a .jsonl of {"text": ...} rows, or a directory of them.')],
        out: Annotated[Path, typer.Option("--out", "-o", help="Aligned bundle directory to write.")],
        description: Annotated[
            str, typer.Option(help="What the corpus is (recorded in the manifest), e.g. 'FineWeb:OpenWebMath 2:1'.")
        ] = "",
        tokens: Annotated[
            int | None,
            typer.Option(
                help="Token budget: steps = ceil(tokens / global batch tokens); without it and --max-steps, one pass over the corpus."
            ),
        ] = None,
        max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (instead of --tokens).")] = None,
        lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule to 0; the paper's 5e-5).")] = 5e-5,
        warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps (the paper's 100).")] = 100,
        weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
        max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: no clipping).")] = 1.0,
        micro_batch: Annotated[int, typer.Option(help="Sequences per forward pass, per process.")] = 4,
        grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step (paper: global batch 128 x 512).")] = 1,
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence (packed blocks).")] = 512,
        train_lm_head: Annotated[
            bool, typer.Option(help="Also train lm_head (and a tied input embedding); frozen by default, as in the paper.")
        ] = False,
        gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = False,
        precision: Precision = PrecisionChoice.auto,
        seed: Annotated[int, typer.Option(min=0, help="Seed for the data order.")] = 0,
        eval_data: Annotated[Path | None, typer.Option(help="Held-out corpus (file or directory).")] = None,
        eval_split: Annotated[
            float, typer.Option(help="Without --eval-data, hold out this fraction of the corpus's blocks (at least one).")
        ] = 0.01,
        eval_every: Annotated[int, typer.Option(help="Held-out loss every N steps (0: before and after only).")] = 0,
        save_every: SaveEvery = 0,
        keep_checkpoints: KeepCheckpoints = False,
        resume: Resume = False,
        fsdp: Annotated[
            bool, typer.Option(help="Shard the model over the torchrun processes (FSDP) instead of replicating it (DDP).")
        ] = False,
        log_every: Annotated[int, typer.Option(help="Progress line every N steps when no progress bar shows (0: never).")] = 50,
        device: Device = None,
        overwrite: Overwrite = False,
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Continual pre-training of a bundle's pruned model (full-parameter, lm_head frozen): a new, aligned bundle."""
        from ..train.align import align
        from ..train.config import AlignConfig

        config = AlignConfig(
            lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm or None,
            tokens=tokens, max_steps=max_steps, micro_batch=micro_batch, grad_accum=grad_accum, seq_len=seq_len,
            train_lm_head=train_lm_head, gradient_checkpointing=gradient_checkpointing, precision=precision.value, seed=seed,
            eval_split=eval_split, eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints,
            fsdp=fsdp, log_every=log_every,
        )  # fmt: skip
        main = int(os.environ.get("RANK", "0")) == 0
        from ..bundle.fsutil import check_out_clear
        from ..hub.resolve import bundle_dir

        path = bundle_dir(bundle, endpoint=endpoint, token=token)
        check_out_clear(out, [path, data, eval_data])
        check_out_clear(out.with_name(out.name + ".ckpt"), [path, data, eval_data])
        s = align(path, data, out, config, description=description, eval_data=eval_data, resume=resume,
                  overwrite=overwrite, device=device, log=lambda m: err.print(m))  # fmt: skip
        if not main:
            return
        if as_json:
            return print_json(s)
        c = s["corpus"]
        rows = [
            ("bundle", f"{s['bundle_id']} (from {s['parent_bundle_id']})"),
            ("corpus", f"{c['files']} file(s), {c['num_tokens']:,} tokens, sha256 {c['sha256'][:16]}"),
            ("steps", f"{s['steps']:,} ({s['world_size']} process(es))"),
            ("tokens", f"{s['tokens_seen']:,}"),
            ("time", f"{s['seconds']:.1f} s ({s['tokens_per_second']:,.0f} tokens/s)"),
            ("peak memory", f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB ({s['device']})"),
            ("precision", f"{s['precision']} ({s['precision_reason']})"),
            ("final train loss", f"{s['final_train_loss']:.4f}"),
        ]
        if s["heldout_loss_before"] is not None:
            rows.append(("held-out loss", f"{s['heldout_loss_before']:.4f} -> {s['heldout_loss_after']:.4f}"))
        console.print(f"aligned {out}")
        for k, v in rows:  # plain lines, not a Table: bundle ids are never cut
            console.print(f"  {k:<17} {v}")
