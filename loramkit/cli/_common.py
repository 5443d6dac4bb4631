"""Shared console; results go to stdout, progress and errors to stderr.

soft_wrap: a message is one line however long (paths, bundle ids), never wrapped at 80
columns when piped; markup off: text in [brackets] (paths, shapes) is printed as is.
"""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
