"""Progress bars for long work (rich), silent when asked or when nothing is a terminal."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
def task(
    description: str, total: float, unit: str = "bytes", show: bool = True, transient: bool = False
) -> Iterator[Callable[[float], None]]:
    """Yield ``advance(n)``; shows a bar with rate and ETA (bytes/s for bytes, items otherwise).

    ``transient``: the bar disappears when done (steps inside a larger one, such as hashing).
    """
    if not enabled(show):
        yield lambda n: None
        return
    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=transient) as bar:
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


def configure_library_bars() -> None:
    """Library bars for the CLI: huggingface_hub's download and upload bars follow ours (shown on a
    terminal unless LORAMKIT_NO_PROGRESS is set; they are the longest waits for a large base);
    transformers' "Loading weights" bar never shows (one per model load, and from_pretrained
    of an already downloaded model takes seconds).

    The transformers hook is installed when transformers is first imported, so commands that
    never load a model do not pay the second its import takes.
    """
    if not enabled():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    _after_import("transformers.utils.logging", lambda logging: logging.set_tqdm_hook(_silent_bar))


def _silent_bar(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "disable": True})  # still iterates; draws nothing


def _after_import(name: str, then: Callable[[Any], None]) -> None:
    """Call ``then(module)`` once module ``name`` is imported: now if it already is, else right after."""
    if name in sys.modules:
        then(sys.modules[name])
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` through the other finders and runs ``then`` once it has executed."""

    def __init__(self, name: str, then: Callable[[Any], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module: Any) -> None:
            exec_module(module)
            then(module)

        spec.loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec
