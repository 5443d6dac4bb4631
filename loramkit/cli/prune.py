"""loramkit prune BASE --out BUNDLE --ratio R [--quantize nf4|fp4]
loramkit prune BASE --out BUNDLE --strategy unstructured --ratio R | --strategy semi-structured --pattern N:M"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer

from ..errors import LoramError
from ._common import AsJson, Endpoint, KeepFirst, KeepLast, QuantType, Token, check_device, check_range, console, print_json
from .inspect import summary


class Importance(str, Enum):
    """How units are ranked (spec 3.4); the one-line meanings are in the command's help."""

    random = "random"
    magnitude = "magnitude"
    taylor = "taylor"
    activation = "activation"
    wanda = "wanda"
    sparsegpt = "sparsegpt"


class Strategy(str, Enum):
    """What is removed: whole heads and channels, or single weights (stored sparse; spec 7.3)."""

    structured = "structured"
    unstructured = "unstructured"
    semi_structured = "semi-structured"


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune_cmd(
        base: Annotated[str, typer.Argument(help="Base model: directory (config.json + safetensors) or Hub repo id.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create.")],
        ratio: Annotated[
            float | None,
            typer.Option(
                help="Fraction removed per pruned layer, in [0, 1): of heads/channels (structured), of each projection's "
                "weights (unstructured); implied by --pattern for semi-structured."
            ),
        ] = None,
        strategy: Annotated[Strategy, typer.Option(help="What is removed (see above).")] = Strategy.structured,
        pattern: Annotated[
            str | None, typer.Option(help="N:M for semi-structured: N kept of every M input columns [default: 2:4].")
        ] = None,
        importance: Annotated[
            Importance, typer.Option(help="How units or weights are ranked (see above).")
        ] = Importance.magnitude,
        calibration: Annotated[
            Path | None,
            typer.Option(help="Calibration texts for taylor, activation, wanda, sparsegpt (.txt passages or .jsonl 'text')."),
        ] = None,
        calibration_samples: Annotated[int, typer.Option(help="Calibration blocks used, fewer when the file holds less.")] = 128,
        seq_len: Annotated[
            int | None,
            typer.Option(
                help="Tokens per calibration block; the text is packed [default: 512, or the model's max positions when fewer]."
            ),
        ] = None,
        keep_first: KeepFirst = None,
        keep_last: KeepLast = None,
        seed: Annotated[int, typer.Option(min=0, help="Seed for random importance.")] = 0,
        device: Annotated[
            str, typer.Option(help="Device of the calibration engine (cpu, cuda, cuda:1 ...): one decoder layer at a time.")
        ] = "cpu",
        offload_dir: Annotated[
            Path | None,
            typer.Option(
                help="Where layer-boundary activations beyond --activation-budget spill (a temporary folder, removed) [default: system temp dir]."
            ),
        ] = None,
        activation_budget: Annotated[
            str, typer.Option(help="Layer-boundary activations kept in memory before spilling to disk.")
        ] = "4GiB",
        max_shard_size: Annotated[str, typer.Option(help="Shard the pruned weights above this size.")] = "2GiB",
        base_name: Annotated[
            str | None, typer.Option(help="Base identity to record (e.g. its Hub repo id) [default: its path].")
        ] = None,
        base_revision: Annotated[str | None, typer.Option(help="Base commit to record, when known.")] = None,
        quantize: Annotated[
            QuantType | None,
            typer.Option(help="Also quantize to 4 bits for QLoRAM (double quant, blocksize 64; see `loramkit quantize`)."),
        ] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Prune a base model into a LoRAM bundle (streaming; memory near one tensor, or one layer when calibrated).

        \b
        Strategy (--strategy):
          structured       whole KV groups and MLP channels removed, shapes shrink (LoRAM-Stru, LoRAM-Rand)
          unstructured     single weights of each projection removed, stored sparse (LoRAM-Unst)
          semi-structured  N of every M input columns kept, e.g. --pattern 2:4, stored sparse (LoRAM-Semi)
        \b
        Importance (--importance), structured:
          random      seeded random units (LoRAM-Rand)
          magnitude   L2 norm of each unit's weights (no calibration)
          taylor      sum of |w * dL/dw| over each unit's weights, L the calibration loss (LoRAM-Stru, LLM-Pruner)
          activation  mean magnitude of each head's and channel's output on calibration text (Minitron; no gradients)
        \b
        Importance, unstructured and semi-structured (layer by layer, each on the pruned layers' outputs):
          magnitude   |w| over the whole projection (no calibration)
          wanda       |w| * L2 norm of its input feature over the calibration tokens, per output row
          sparsegpt   SparseGPT: Hessian-based mask per 128-column block and updates of the kept weights
        """
        from ..bundle.model_dir import parse_size
        from ..pipeline import check_quantizable, prune_quantized
        from ..prune.pruner import prune

        if ratio is not None:
            check_range("--ratio", ratio, low=0, high=1, high_open=True)
        elif strategy is not Strategy.semi_structured:  # a usage error (exit 2), as when typer required it
            what = "of heads and channels" if strategy is Strategy.structured else "of each projection's weights"
            raise click.UsageError(f"Missing option '--ratio': --strategy {strategy.value} needs the fraction {what} removed")
        if strategy is not Strategy.structured:
            from ..prune.sparse_writer import sparse_settings

            sparse_settings(strategy.value, ratio, pattern, importance.value, calibration)  # refused before any download
            if quantize is not None:
                check_quantizable(strategy.value)
        elif pattern is not None:
            raise LoramError(f"--pattern {pattern} is for --strategy semi-structured; structured pruning removes whole units")
        check_range("--calibration-samples", calibration_samples, low=1)
        check_range("--seq-len", seq_len, low=1)
        check_range("--keep-first", keep_first, low=0)
        check_range("--keep-last", keep_last, low=0)
        check_device(device)
        if base_revision is not None and not re.fullmatch(r"[0-9a-f]{40}", base_revision):
            raise LoramError(
                f"--base-revision {base_revision!r} is not a commit sha (40 hex digits); the bundle records the exact commit"
            )
        sizes = {}
        for flag, text in (("--max-shard-size", max_shard_size), ("--activation-budget", activation_budget)):
            try:
                sizes[flag] = parse_size(text)
            except ValueError:
                raise LoramError(f"{flag} {text!r} is not a size; use e.g. 2GiB, 500MB or a byte count") from None
        from ..hub.resolve import identity, model_dir

        base_path = model_dir(base, endpoint=endpoint, token=token)
        repo, commit = identity(base_path, base)  # a Hub base is recorded by repo id and commit
        base_name, base_revision = base_name or repo, base_revision or commit
        kw = dict(
            strategy=strategy.value, pattern=pattern, importance=importance.value, calibration=calibration, keep_first=keep_first, keep_last=keep_last,
            seed=seed, device=device, max_shard_size=max_shard_size, base_name=base_name,
            calibration_samples=calibration_samples, calibration_seq_len=seq_len, offload_dir=offload_dir,
            activation_budget=sizes["--activation-budget"],
            base_revision=base_revision, overwrite=overwrite,
        )  # fmt: skip
        if quantize is None:
            m = prune(base_path, out, ratio, **kw)
        else:
            kw.pop("overwrite")
            m = prune_quantized(base_path, out, ratio, quantize.value, overwrite=overwrite, **kw)
        if as_json:
            return print_json(summary(out))
        p, pl = m["parameters"], m["pruning"]["pruned_layers"]
        layers = f"layers {pl[0]}-{pl[-1]} pruned" if pl else "no layer pruned"
        if m.get("sparsity"):
            kind = m["sparsity"]["pattern"] or f"{m['pruning']['ratio']:g} unstructured"
            layers += f" ({kind}, {len(m['sparsity']['modules'])} projections stored sparse)"
        quantized = f", {m['quantization']['quant_type']} 4-bit" if m["quantization"] else ""
        console.print(
            f"wrote {out}: {p['original']:,} -> {p['pruned']:,} parameters ({p['pruned'] / p['original']:.1%}), "
            f"{layers}{quantized}; bundle {m['bundle_id']}"
        )
