"""Progress bars for long work (rich), silent when asked or when nothing is a terminal."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_console = Console(stderr=True)


def enabled(requested: bool = True) -> bool:
    return requested and not os.environ.get("LORAMKIT_NO_PROGRESS") and _console.is_terminal


@contextmanager
def task(description: str, total: float, unit: str = "bytes", show: bool = True) -> Iterator[Callable[[float], None]]:
    """Yield ``advance(n)``; shows a bar with rate and ETA (bytes/s for bytes, items otherwise)."""
    if not enabled(show):
        yield lambda n: None
        return
    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=False) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda n: bar.advance(tid, n)


@contextmanager
def training(total: int, done: int = 0, show: bool = True) -> Iterator[Callable[[int, float, float, float], None]]:
    """Yield ``update(step, loss, lr, tokens_per_s)`` for a bar over optimizer steps."""
    if not enabled(show):
        yield lambda *a: None
        return
    columns = [
        TextColumn("training"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    ]  # fmt: skip
    with Progress(*columns, console=_console, transient=False) as bar:
        tid = bar.add_task("training", total=total, completed=done, loss=float("nan"), lr=0.0, tps=0.0)
        yield lambda step, loss, lr, tps: bar.update(tid, completed=step, loss=loss, lr=lr, tps=tps)
