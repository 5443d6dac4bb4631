"""loramkit publish BUNDLE --repo ORG/NAME [--revision BRANCH] [--private] [--endpoint URL] [--token ...] [--json]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import AsJson, Endpoint, Token, console, err, print_json


def register(app: typer.Typer) -> None:
    @app.command("publish")
    def publish_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory to publish.")],
        repo: Annotated[str, typer.Option(help="Hub repo id, ORG/NAME.")],
        revision: Annotated[str, typer.Option(help="Branch to commit to.")] = "main",
        private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Validate a bundle, refresh its model card, upload it in one commit, tag it with its format version."""
        from ..hub.publish import publish

        r = publish(bundle, repo, revision=revision, private=private, endpoint=endpoint, token=token,
                    log=lambda m: err.print(m))  # fmt: skip
        if as_json:
            return print_json(r)
        if r["commit_url"]:
            console.print(f"published {bundle} to {repo}@{revision}: {len(r['changed'])} file(s) changed, tag {r['tag']}")
            console.print(r["commit_url"])
        else:
            console.print(f"{repo}@{revision} is up to date (commit {r['commit']})")
