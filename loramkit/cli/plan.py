"""loramkit plan BASE --ratio R [--strategy structured|unstructured|semi-structured] [--pattern N:M]
[--importance magnitude|wanda|sparsegpt] [--quantize nf4|fp4] [--lora-rank r] [--seq-len L --batch B] [--json]"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..errors import LoramError
from ._common import AsJson, Endpoint, KeepFirst, KeepLast, QuantType, Token, check_range, console, print_json


def _config(base: str, endpoint: str | None, token: str | None) -> dict:
    """config.json of a file, a model directory, or a Hub repo (config.json alone is fetched)."""
    from ..bundle.fsutil import read_json
    from ..hub.resolve import HubRef, download, parse_ref

    where = parse_ref(base)
    if isinstance(where, HubRef):
        where = download(where, ["config.json"], endpoint=endpoint, token=token)
    path = where / "config.json" if where.is_dir() else where
    if not path.is_file():
        raise LoramError(f"{base}: no such config file, model directory or Hub repo")
    return read_json(path, "config.json", LoramError)


def _gib(b: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB so small models do not read as zero."""
    return f"{b / 2**30:,.1f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB"


def plan_table(p: dict, title: str, actual: tuple[str, int] | None = None) -> Table:
    """The five methods side by side; ``actual`` = (method, bytes) adds a bundle's real weight bytes."""
    table = Table(title=title)
    cols = ["method", "parameters", "storage (paper)", "x", "storage real", "x", "trainable", "train memory", "checkpointed"]
    if actual:
        cols.insert(5, "this bundle")
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in p["methods"]:
        row = [m["method"], f"{m['parameters']:,}", _gib(m["storage_theoretical"]), f"{m['reduction_theoretical']:.2f}x",
               _gib(m["storage_real"])]  # fmt: skip
        if actual:
            row.append(_gib(actual[1]) if m["method"] == actual[0] else "")
        row += [
            f"{m['reduction_real']:.2f}x",
            f"{m['trainable']:,}",
            _gib(m["train_memory"]),
            _gib(m["train_memory_checkpointed"]),
        ]
        table.add_row(*row)
    return table


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        base: Annotated[
            str, typer.Argument(help="config.json, a model directory, or a Hub repo id (only config.json is fetched).")
        ],
        ratio: Annotated[
            float | None,
            typer.Option(help="Pruning ratio for LoRAM / QLoRAM, or of weights removed for --strategy unstructured."),
        ] = None,
        strategy: Annotated[
            str, typer.Option(help="structured (LoRAM-Stru), unstructured (LoRAM-Unst) or semi-structured (LoRAM-Semi).")
        ] = "structured",
        pattern: Annotated[str | None, typer.Option(help="N:M kept of every M weights, for --strategy semi-structured.")] = None,
        importance: Annotated[
            str, typer.Option(help="magnitude | wanda | sparsegpt: how --strategy unstructured rounds its kept counts.")
        ] = "magnitude",
        quantize: Annotated[QuantType, typer.Option(help="4-bit type for QLoRA / QLoRAM.")] = QuantType.nf4,
        keep_first: KeepFirst = None,
        keep_last: KeepLast = None,
        lora_rank: Annotated[int, typer.Option(help="LoRA rank (all seven projections).")] = 8,
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence, for the activation estimate.")] = 512,
        batch: Annotated[int, typer.Option(help="Sequences per micro-batch, for the activation estimate.")] = 1,
        as_json: AsJson = False,
        endpoint: Endpoint = None,
        token: Token = None,
    ) -> None:
        """Parameters, storage and training memory of full FT, LoRA, QLoRA, LoRAM and QLoRAM for a model
        (with --strategy unstructured / semi-structured: LoRAM-Unst / LoRAM-Semi, compressed and zero-filled)."""
        from ..planner import SPARSE_METHODS, STRATEGIES, plan

        if strategy not in STRATEGIES:
            raise LoramError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if strategy == "structured" and (ratio is None or pattern is not None):
            raise LoramError("--strategy structured takes --ratio, not --pattern")
        check_range("--ratio", ratio, low=0, high=1, high_open=True)
        for option, value, low in (("--keep-first", keep_first, 0), ("--keep-last", keep_last, 0), ("--lora-rank", lora_rank, 1),
                                   ("--seq-len", seq_len, 1), ("--batch", batch, 1)):  # fmt: skip
            check_range(option, value, low=low)
        p = plan(_config(base, endpoint, token), ratio, strategy=strategy, pattern=pattern, importance=importance,
                 quant_type=quantize.value, keep_first=keep_first, keep_last=keep_last, lora_rank=lora_rank,
                 seq_len=seq_len, batch=batch)  # fmt: skip
        if as_json:
            return print_json(p)
        pl = p["pruned_layers"]
        how = {"structured": f"ratio {ratio}", "unstructured": f"unstructured {ratio} ({importance})"}.get(
            strategy, f"semi-structured {pattern}"
        )
        console.print(plan_table(p, f"{base} ({p['architecture']}), {how}, layers {pl[0]}-{pl[-1]} pruned" if pl else base))
        if strategy != "structured":
            name = SPARSE_METHODS[strategy]
            console.print(
                f"{name}: kept weights in 16-bit + a 1-bit-per-weight mask of every sparsified projection, the rest dense, "
                f"trained compressed (one weight expanded at a time). {name} (zero-filled): the same masks with the pruned "
                "weights stored as zeros, as the paper trains them; 'storage (paper)' counts 16 bits per kept weight."
            )
        console.print(
            f"4-bit: {quantize.value}, block size 64, double quantization; real bytes count the block constants and the "
            f"16-bit embeddings, lm_head, norms and biases. Training memory is an estimate for batch {batch} x "
            f"{seq_len} tokens, LoRA r={lora_rank} (weights + AdamW states + activations)."
        )
