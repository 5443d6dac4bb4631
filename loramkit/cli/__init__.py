"""The ``loramkit`` command: a thin Typer layer that parses, calls the library, and prints.

Every failure ends with one line on stderr and a non-zero exit: user errors
(:class:`~loramkit.errors.LoramError`) and system errors (permissions, a full disk) exit 1,
usage errors 2, an interrupt (Ctrl-C, SIGTERM) 130, and a bug prints
``error: internal error: ...`` with exit 1. Tracebacks only with ``--debug`` (before the
command) or ``LORAMKIT_DEBUG=1``.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

import click
import typer

try:  # recent typer vendors click (typer._click) and raises those exceptions, not click's
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _cx

from .. import progress
from ..errors import LoramError
from . import align, demo, evaluate, inspect, plan, prune, publish, quantize, recover, train, validate

app = typer.Typer(
    name="loramkit",
    help="LoRAM: train LoRA on a pruned model, deploy it on the original.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts say "[default: ...]" literally
)
_DEBUG = {"on": False, "terminated": False}  # --debug / LORAMKIT_DEBUG; whether SIGTERM arrived


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Print tracebacks of errors (also: LORAMKIT_DEBUG=1)."),
) -> None:
    """LoRAM: train LoRA on a pruned model, deploy it on the original."""
    _DEBUG["on"] = _DEBUG["on"] or debug


for module in (plan, prune, quantize, inspect, validate, align, train, evaluate, recover, publish, demo):
    module.register(app)


# Library warnings a loramkit user can do nothing about, matched by the start of their message
# (a regex): every other warning shows, so news from a library update reaches the user.
KNOWN_NOISE: tuple[str, ...] = (
    # transformers 5.x, whenever peft wraps a model (peft reads the old property name).
    r"`is_gradient_checkpointing` is deprecated",
)


def _quiet_libraries() -> None:
    """Known library noise off (by message, never a whole category); download and upload bars on."""
    progress.configure_library_bars()
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every staged output is cleaned up on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    _DEBUG["terminated"] = True
    raise Terminated()


def _one_line(exc: BaseException) -> str:
    """An exception as the one ``error:`` line (first line of its message)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror[0].lower()}{exc.strerror[1:]}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; returns the exit code instead of exiting."""
    from ..bundle.fsutil import is_disk_full

    _quiet_libraries()
    _DEBUG.update(on=os.environ.get("LORAMKIT_DEBUG", "") not in ("", "0"), terminated=False)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        rv = app(args=argv, prog_name="loramkit", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into Exit(130), silently
            return _interrupted(exc.__cause__)
        return exc.exit_code
    except (click.ClickException, _cx.ClickException) as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt) as exc:
        return _interrupted(exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else exc)
    except LoramError as exc:
        _traceback()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # permissions, a full disk, a vanished file: the system's words, one line
        _traceback()
        hint = "; free space and re-run" if is_disk_full(exc) else ""
        print(f"error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line, the traceback on request
        _traceback()
        print(
            f"error: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", file=sys.stderr
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rv == 130:  # typer returns Ctrl-C (and our SIGTERM) as 130 without a word
        return _interrupted(Terminated() if _DEBUG["terminated"] else KeyboardInterrupt())
    return rv if isinstance(rv, int) else 0


def _interrupted(exc: BaseException) -> int:
    if _DEBUG["on"] and exc.__traceback__ is not None:
        traceback.print_exception(exc)
    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
    print(f"{what}; no output was written", file=sys.stderr)
    return 130


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _traceback() -> None:
    if _DEBUG["on"]:
        traceback.print_exc()


def main() -> None:
    sys.exit(run())
