"""loramkit recover ADAPTER --out OUT [--bundle BUNDLE] [--merge --base BASE --merged-out DIR]"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LoramError
from ._common import console


def register(app: typer.Typer) -> None:
    @app.command("recover")
    def recover_cmd(
        adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter trained on a bundle's pruned model.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the full-model adapter.")],
        bundle: Annotated[Optional[Path], typer.Option(help="The bundle it was trained on [default: the one the adapter names].")] = None,
        merge: Annotated[bool, typer.Option(help="Also write the base model with the adapter merged in.")] = False,
        base: Annotated[Optional[Path], typer.Option(help="Base model directory, for --merge.")] = None,
        merged_out: Annotated[Optional[Path], typer.Option(help="Where to write the merged model, for --merge.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace outputs that exist.")] = False,
    ) -> None:
        """Turn an adapter of the pruned model into a standard PEFT adapter of the original model."""
        from ..bundle import Bundle
        from ..recover.adapter import recover_adapter
        from ..recover.merge import merge_adapter

        if merge and (base is None or merged_out is None):
            raise LoramError("--merge needs --base BASE and --merged-out DIR")
        if merged_out is not None and merged_out.exists() and not overwrite:
            raise LoramError(f"{merged_out} already exists; choose another output or pass --overwrite")
        existed = out.exists()
        result = recover_adapter(adapter, out, bundle, overwrite=overwrite)
        console.print(f"wrote {out}: {result['modules']} modules recovered for {result['base']}")
        if merge:
            try:
                merge_adapter(base, out, merged_out, Bundle(result["bundle"]), overwrite=overwrite)
            except BaseException:
                if not existed:  # all or nothing: a failed merge takes back the adapter it needed
                    shutil.rmtree(out, ignore_errors=True)
                raise
            console.print(f"wrote {merged_out}: {base} with the adapter merged")
