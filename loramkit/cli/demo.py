"""loramkit demo [--workdir DIR]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, err


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        workdir: Annotated[Path, typer.Option(help="Where the demo writes its models.")] = Path("demo-output"),
        ratio: Annotated[float, typer.Option(help="Pruning ratio.")] = 0.5,
        steps: Annotated[int, typer.Option(help="LoRA training steps on the pruned model.")] = 150,
    ) -> None:
        """Prune a small embedded model, train LoRA on it, recover onto the original, compare."""
        from ..demo import run

        result = run(workdir, ratio=ratio, steps=steps, log=lambda s: err.print(s))
        table = Table(title=f"held-out task data ({result['seconds']:.0f} s)")
        for col in ("model", "loss", "perplexity", "weights on disk"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in result["rows"]:
            table.add_row(r["model"], f"{r['loss']:.3f}", f"{r['perplexity']:.1f}", f"{r['bytes'] / 2**20:.1f} MiB")
        console.print(table)
