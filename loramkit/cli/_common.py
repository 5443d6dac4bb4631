"""Shared console; results go to stdout, progress and errors to stderr."""

from rich.console import Console

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)
