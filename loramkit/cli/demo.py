"""loramkit demo [--workdir DIR]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..precision import PrecisionChoice
from ._common import Precision, console, err


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        workdir: Annotated[Path, typer.Option(help="Where the demo writes its models (the base is cached there).")] = Path(
            "demo-output"
        ),
        ratio: Annotated[float, typer.Option(help="Pruning ratio.")] = 0.5,
        steps: Annotated[int, typer.Option(help="LoRA training steps.")] = 120,
        precision: Precision = PrecisionChoice.auto,
    ) -> None:
        """Pre-train a small model, prune + quantize it, train LoRA on it, recover onto the original, compare."""
        from ..demo import run

        result = run(workdir, ratio=ratio, steps=steps, precision=precision.value, log=lambda s: err.print(s))
        table = Table(title=f"held-out task data ({result['seconds']:.0f} s in all, {result['precision']['precision']})")
        for col in ("model", "perplexity", "weights", "train peak", "train tok/s"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in result["rows"]:
            peak = f"{r['train_peak_bytes'] / 2**20:,.0f} MiB" if r["train_peak_bytes"] else "-"
            tps = f"{r['train_tokens_per_second']:,.0f}" if r["train_tokens_per_second"] else "-"
            table.add_row(r["model"], f"{r['perplexity']:.3f}", f"{r['parameter_bytes'] / 2**20:.1f} MiB", peak, tps)
        console.print(table)
