"""loramkit quantize BUNDLE --out BUNDLE2 [--type nf4|fp4] [--double-quant/--no-double-quant] [--blocksize 64] [--json]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import AsJson, Endpoint, QuantType, Token, console, print_json
from .inspect import summary


def describe(m: dict) -> str:
    """One line: what a 4-bit bundle holds and how big its weights are."""
    q = m["quantization"]
    weights = sum(m["files"][f]["size"] for f in m["weights"]["files"])
    dq = "double quant" if q["double_quant"] else "no double quant"
    return (
        f"{q['quant_type']} (blocksize {q['blocksize']}, {dq}, compute {q['compute_dtype']}): "
        f"{len(q['modules'])} Linear modules in 4 bits, {q['unquantized']} ({m['weights']['dtype']}); "
        f"weights {weights / 2**20:,.2f} MiB"
    )


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        bundle: Annotated[str, typer.Argument(help="Bundle to quantize (16/32-bit weights): directory or Hub repo id.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="4-bit bundle directory to create.")],
        quant_type: Annotated[
            QuantType, typer.Option("--type", help="4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.")
        ] = QuantType.nf4,
        double_quant: Annotated[
            bool, typer.Option(help="Also quantize the per-block constants (QLoRA's double quantization).")
        ] = True,
        blocksize: Annotated[int, typer.Option(help="Values per quantization block: 32, 64, ..., 4096.")] = 64,
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Write a 4-bit (bitsandbytes NF4/FP4) copy of a bundle for QLoRAM training (streaming)."""
        from ..hub.resolve import bundle_dir
        from ..quant import quantize_bundle

        source = bundle_dir(bundle, endpoint=endpoint, token=token)
        m = quantize_bundle(source, out, quant_type.value, double_quant, blocksize, overwrite=overwrite)
        if as_json:
            return print_json(summary(out))
        console.print(f"wrote {out}: {describe(m)}; bundle {m['bundle_id']}")
