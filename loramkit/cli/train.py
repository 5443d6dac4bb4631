"""loramkit train BUNDLE --data FILE --out ADAPTER [--json]"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..precision import PrecisionChoice
from ._common import (
    AsJson,
    DataFormat,
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
    @app.command("train")
    def train_cmd(
        bundle: Annotated[
            str, typer.Argument(help="LoRAM bundle (pruned, optionally 4-bit) to train on: directory or Hub repo id.")
        ],
        data: Annotated[Path, typer.Option(help=".txt, or .jsonl with text / instruction+output / messages.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write.")],
        rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
        alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 16.0,
        dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
        target: Annotated[
            list[str] | None, typer.Option(help="Target module (repeatable) [default: q,k,v,o,gate,up,down].")
        ] = None,
        lm_head: Annotated[bool, typer.Option(help="Also adapt lm_head.")] = False,
        rslora: Annotated[bool, typer.Option(help="Rank-stabilised scaling alpha/sqrt(r).")] = False,
        lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 2e-4,
        warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 0,
        weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
        epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 1.0,
        max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
        micro_batch: Annotated[int, typer.Option(help="Examples per forward pass, per process.")] = 4,
        grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
        seq_len: Annotated[int, typer.Option(help="Tokens per example (packed text) / truncation length.")] = 512,
        gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = False,
        precision: Precision = PrecisionChoice.auto,
        seed: Annotated[int, typer.Option(min=0, help="Seed for data order, LoRA init and dropout.")] = 0,
        eval_data: Annotated[Path | None, typer.Option(help="Held-out data file.")] = None,
        eval_split: Annotated[float, typer.Option(help="Hold out this fraction of --data when no --eval-data.")] = 0.0,
        eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: at the end only).")] = 0,
        save_every: SaveEvery = 0,
        keep_checkpoints: KeepCheckpoints = False,
        resume: Resume = False,
        data_format: Annotated[DataFormat, typer.Option(help="How --data is read (auto: from the file).")] = DataFormat.auto,
        device: Device = None,
        overwrite: Overwrite = False,
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Train a LoRA adapter on a bundle's pruned model (runs unchanged under torchrun)."""
        from ..train.config import DEFAULT_TARGETS, TrainConfig
        from ..train.trainer import train

        config = TrainConfig(
            rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(target or DEFAULT_TARGETS), lm_head=lm_head,
            rslora=rslora, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, epochs=epochs,
            max_steps=max_steps, micro_batch=micro_batch, grad_accum=grad_accum, seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing, precision=precision.value, seed=seed, eval_split=eval_split,
            eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints, data_format=data_format.value,
        )  # fmt: skip
        main = int(os.environ.get("RANK", "0")) == 0
        from ..hub.resolve import HubRef, bundle_dir, identity, parse_ref

        path = bundle_dir(bundle, endpoint=endpoint, token=token)
        from ..bundle.fsutil import check_out_clear

        for target in (out, out.with_name(out.name + ".ckpt")):  # the adapter and its checkpoints
            check_out_clear(target, [path, data, eval_data])
        repo, commit = identity(path, bundle)
        ref = f"{repo}@{commit}" if repo and commit else (bundle if isinstance(parse_ref(bundle), HubRef) else None)
        s = train(path, data, out, config, bundle_ref=ref, eval_data=eval_data, resume=resume, overwrite=overwrite, device=device,
                  log=lambda m: err.print(m))  # fmt: skip
        if not main:
            return
        if as_json:
            return print_json(s)
        table = Table(title=f"trained {out}", show_header=False)
        rows = [
            ("steps", f"{s['steps']:,} ({s['examples']:,} {s['data_format']} examples, {s['world_size']} process(es))"),
            ("tokens", f"{s['tokens']:,}"),
            ("time", f"{s['seconds']:.1f} s ({s['tokens_per_second']:,.0f} tokens/s)"),
            ("peak memory", f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB ({s['device']})"),
            ("precision", f"{s['precision']} ({s['precision_reason']})"),
            ("final train loss", f"{s['final_train_loss']:.4f}"),
        ]
        if s["eval_loss"] is not None:
            rows.append(("eval loss", f"{s['eval_loss']:.4f} (perplexity {math.exp(min(s['eval_loss'], 700)):.2f}, "
                                      f"next-token accuracy {s['eval_accuracy']:.3f})"))  # fmt: skip
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)
