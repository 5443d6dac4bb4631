"""Shared console; results go to stdout, progress and errors to stderr.

soft_wrap: a message is one line however long (paths, bundle ids), never wrapped at 80
columns when piped; markup off: text in [brackets] (paths, shapes) is printed as is.
"""

import sys

from rich.console import Console

# Piped output is not cut to 80 columns: tables keep their numbers whole.
console = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

# Every command that takes a bundle or a model takes a Hub repo id (org/name[@revision]) too.
Endpoint = Annotated[Optional[str], typer.Option(help="Hub endpoint [default: $HF_ENDPOINT or huggingface.co].")]
Token = Annotated[Optional[str], typer.Option(help="Hub token [default: $HF_TOKEN or the saved login].")]
