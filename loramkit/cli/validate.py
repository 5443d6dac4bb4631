"""loramkit validate BUNDLE [--json]"""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import AsJson, Endpoint, Token, console, err, print_json


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate_cmd(
        bundle: Annotated[str, typer.Argument(help="Bundle directory or Hub repo id (org/name[@revision]).")],
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Check schema, hashes, shapes and index maps; exit 0 only when the bundle is sound."""
        from ..bundle.manifest import load_manifest
        from ..bundle.validate import validate
        from ..hub.resolve import bundle_dir

        path = bundle_dir(bundle, endpoint=endpoint, token=token)
        problems, warnings = validate(path)
        if as_json:  # exit code as without --json: 1 when unsound
            m = load_manifest(path, check_id=False)
            print_json({"bundle": bundle, "path": str(path), "sound": not problems, "problems": problems, "warnings": warnings,
                        "format_version": m["format_version"], "bundle_id": m["bundle_id"]})  # fmt: skip
            raise typer.Exit(1 if problems else 0)
        for w in warnings:
            err.print(f"warning: {w}")
        for p in problems:
            err.print(f"problem: {p}")
        if problems:
            err.print(f"error: {bundle} is not a sound bundle ({len(problems)} problem(s))")
            raise typer.Exit(1)
        m = load_manifest(path)  # spec section 9: report the format version and bundle_id
        console.print(f"{bundle}: sound (format {m['format_version']}, {m['bundle_id']})")
