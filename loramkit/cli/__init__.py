"""The ``loramkit`` command: a thin Typer layer that parses, calls the library, and prints.

User errors (:class:`~loramkit.errors.LoramError`) print as one line on stderr with exit
code 1; usage errors exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
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


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; returns the exit code instead of exiting."""
    _quiet_libraries()
    try:
        rv = app(args=argv, prog_name="loramkit", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except (click.ClickException, _cx.ClickException) as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    except LoramError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())
