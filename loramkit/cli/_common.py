"""Shared console; results go to stdout, progress and errors to stderr.

soft_wrap: a message is one line however long (paths, bundle ids), never wrapped at 80
columns when piped; markup off: text in [brackets] (paths, shapes) is printed as is.
"""

import json
import sys
from enum import Enum
from typing import Any

from rich.console import Console

# Piped output is not cut to 80 columns: tables keep their numbers whole.
console = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

# Every command that takes a bundle or a model takes a Hub repo id (org/name[@revision]) too.
Endpoint = Annotated[str | None, typer.Option(help="Hub endpoint [default: $HF_ENDPOINT or huggingface.co].")]
Token = Annotated[str | None, typer.Option(help="Hub token [default: $HF_TOKEN or the saved login].")]
# Options of the long-running commands (train, align), spelled once.
SaveEvery = Annotated[int, typer.Option(help="Checkpoint to OUT.ckpt/ every N steps (0: never).")]
KeepCheckpoints = Annotated[bool, typer.Option(help="Keep OUT.ckpt/ after a successful run.")]
Resume = Annotated[bool, typer.Option(help="Continue from the newest checkpoint in OUT.ckpt/.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... [default: cuda when present].")]
Overwrite = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]
# Which layers stay whole: prune and plan spell it once.
KeepFirst = Annotated[int | None, typer.Option(help="Layers left intact at the start [default: 4, fewer when shallow].")]
KeepLast = Annotated[int | None, typer.Option(help="Layers left intact at the end [default: 2, fewer when shallow].")]
# Every command that ends with a summary prints it as one JSON object on stdout instead.
AsJson = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout (for scripts).")]


def print_json(summary: dict[str, Any]) -> None:
    """The --json output: one object, nothing else on stdout (progress and messages go to stderr)."""
    print(json.dumps(summary, indent=2, default=str))  # default=str: paths


from ..bundle.quantization import QUANT_TYPES  # noqa: E402  (no torch: the format's tables)

# Choices as enums: typer lists them in --help and refuses others as a usage error (exit 2).
# 4-bit data types, from the format's own table (bundle format 7.1).
QuantType = Enum("QuantType", {t: t for t in QUANT_TYPES}, type=str)  # type: ignore[misc]


class DataFormat(str, Enum):
    """Training / evaluation data formats (loramkit.train.data.FORMATS, plus auto-detection)."""

    auto = "auto"
    text = "text"
    jsonl_text = "jsonl-text"
    instructions = "instructions"
    chat = "chat"


from ..precision import PrecisionChoice  # noqa: E402

Precision = Annotated[
    PrecisionChoice,
    typer.Option(help="auto: bf16 autocast where the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 "
                      "or AMX), else fp32 (fp16-mixed on CUDA without bf16) | bf16-mixed | fp16-mixed | bf16 | fp32."),
]  # fmt: skip


def check_range(option: str, value: float | None, *, low: float | None = None, high: float | None = None,
                high_open: bool = False) -> None:  # fmt: skip
    """Refuse a numeric option that is not finite or lies outside [low, high] (or [low, high)):
    typer's min/max let NaN through (every comparison with NaN is false).

    Raises:
        LoramError: one line naming the option, the value and the range.
    """
    import math

    from ..errors import LoramError

    if value is None:
        return
    bad = (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lo = "" if low is None else f">= {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise LoramError(
            f"{option} {value} is out of range: it must be a finite number {' and '.join(x for x in (lo, hi) if x)}".rstrip()
        )


def check_device(device: str | None) -> None:
    """Refuse ``--device cuda...`` where CUDA is not available (one line, not a torch traceback)."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    from ..errors import LoramError

    if not torch.cuda.is_available():
        raise LoramError(f"--device {device}: CUDA is not available here; use --device cpu")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise LoramError(f"--device {device}: no such CUDA device (this machine has {torch.cuda.device_count()})")
