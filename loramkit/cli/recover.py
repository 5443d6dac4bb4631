"""loramkit recover ADAPTER --out OUT [--bundle BUNDLE] [--merge --base BASE --merged-out DIR] [--json]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LoramError
from ._common import AsJson, Endpoint, Token, console, print_json


def register(app: typer.Typer) -> None:
    @app.command("recover")
    def recover_cmd(
        adapter: Annotated[
            str, typer.Argument(help="PEFT LoRA adapter trained on a bundle's pruned model (directory or Hub repo id).")
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the full-model adapter.")],
        bundle: Annotated[
            str | None,
            typer.Option(help="The bundle it was trained on, directory or Hub repo id [default: the one the adapter records]."),
        ] = None,
        merge: Annotated[bool, typer.Option(help="Also write the base model with the adapter merged in.")] = False,
        base: Annotated[str | None, typer.Option(help="Base model (directory or Hub repo id), for --merge.")] = None,
        merged_out: Annotated[Path | None, typer.Option(help="Where to write the merged model, for --merge.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace outputs that exist.")] = False,
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Turn an adapter of the pruned model into a standard PEFT adapter of the original model."""
        from ..bundle import Bundle
        from ..bundle.fsutil import check_out_clear
        from ..hub.resolve import adapter_dir, bundle_dir, model_dir
        from ..recover.adapter import recover_adapter
        from ..recover.merge import merge_adapter

        if merge and (base is None or merged_out is None):
            raise LoramError("--merge needs --base BASE and --merged-out DIR")
        if merged_out is not None and merged_out.exists() and not overwrite:
            raise LoramError(f"{merged_out} already exists; choose another output or pass --overwrite")
        hub = dict(endpoint=endpoint, token=token)
        adapter_path = adapter_dir(adapter, **hub)
        bundle_path = bundle_dir(bundle, "metadata", **hub) if bundle else _recorded_bundle(adapter_path, hub)
        base_path = model_dir(base, **hub) if merge else None
        if merged_out is not None:
            check_out_clear(merged_out, [out, adapter_path, bundle_path, base_path])
            check_out_clear(out, [merged_out])

        def merge_staged(staged_adapter: Path, b: Bundle) -> None:
            """The merge reads the adapter before it becomes OUT: both outputs or neither (re-runnable)."""
            merge_adapter(base_path, staged_adapter, merged_out, b, overwrite=overwrite)

        result = recover_adapter(adapter_path, out, bundle_path, overwrite=overwrite, then=merge_staged if merge else None)
        result = {"adapter": adapter, "out": str(out), **result, "merged": str(merged_out) if merge else None}
        if not as_json:
            how = "rebound (sparse bundle: shapes unchanged) to" if result["recovery"] == "rebind" else "recovered for"
            console.print(f"wrote {out}: {result['modules']} modules {how} {result['base']}")
            if merge:
                console.print(f"wrote {merged_out}: {base} with the adapter merged")
        if as_json:
            print_json(result)


def _recorded_bundle(adapter: Path, hub: dict) -> Path | None:
    """The bundle ``loramkit train`` recorded: its path when it is still there, else its Hub id (cache first)."""
    from ..bundle.fsutil import read_json
    from ..bundle.manifest import ADAPTER_RECORD_NAME, MANIFEST_NAME
    from ..errors import AdapterError
    from ..hub.resolve import bundle_dir

    record_path = adapter / ADAPTER_RECORD_NAME
    if not record_path.is_file():
        return None  # recover_adapter looks at base_model_name_or_path
    record = read_json(record_path, ADAPTER_RECORD_NAME, AdapterError)
    if record.get("bundle") and (Path(record["bundle"]) / MANIFEST_NAME).is_file():
        return Path(record["bundle"])
    if record.get("bundle_ref"):
        return bundle_dir(record["bundle_ref"], "metadata", **hub)
    return None
