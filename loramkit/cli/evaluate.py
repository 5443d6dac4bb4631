"""loramkit eval MODEL [--adapter A] --data FILE [--json]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LoramError
from ..precision import PrecisionChoice
from ._common import AsJson, DataFormat, Endpoint, Precision, Token, check_device, check_range, console, print_json


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Annotated[str, typer.Argument(help="A model directory, a LoRAM bundle, or a Hub repo id of either.")],
        data: Annotated[Path, typer.Option(help=".txt or .jsonl (same formats as train).")],
        adapter: Annotated[
            str | None, typer.Option(help="A PEFT LoRA adapter (directory or Hub repo id) to apply first.")
        ] = None,
        seq_len: Annotated[
            int | None, typer.Option(help="Tokens per example [default: 512, or less if the model takes less].")
        ] = None,
        micro_batch: Annotated[int, typer.Option(help="Examples per forward pass.")] = 8,
        data_format: Annotated[DataFormat, typer.Option(help="How --data is read (auto: from the file).")] = DataFormat.auto,
        precision: Precision = PrecisionChoice.auto,
        device: Annotated[str, typer.Option(help="cpu, cuda ...")] = "cpu",
        as_json: AsJson = False,
        endpoint: Endpoint = None,
        token: Token = None,
    ) -> None:
        """Perplexity and next-token accuracy of a model (and adapter) on held-out data."""

        from ..model.loader import load_model
        from ..precision import resolve_precision
        from ..train.data import load_examples
        from ..train.metrics import evaluate

        check_range("--seq-len", seq_len, low=1)
        check_range("--micro-batch", micro_batch, low=1)
        check_device(device)
        prec = resolve_precision(precision.value, device)
        from ..hub.resolve import adapter_dir, model_or_bundle_dir

        model_path = model_or_bundle_dir(model, endpoint=endpoint, token=token)
        adapter_path = adapter_dir(adapter, endpoint=endpoint, token=token) if adapter else None
        # fp32 weights (bf16 weights only under pure bf16); a 4-bit bundle computes in the run's precision.
        m = load_model(model_path, dtype="bfloat16" if prec.name == "bf16" else "float32", device=device,
                       compute_dtype=prec.compute_dtype)  # fmt: skip
        max_len = getattr(m.config, "max_position_embeddings", None)
        if seq_len is None:
            seq_len = min(512, max_len or 512)
        elif max_len is not None and seq_len > max_len:
            raise LoramError(f"--seq-len {seq_len} is longer than the model takes ({max_len})")
        if adapter is not None:
            import peft

            if not (adapter_path / "adapter_config.json").is_file():
                raise LoramError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
            try:
                m = peft.PeftModel.from_pretrained(m, adapter_path)
            except (RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0]
                raise LoramError(
                    f"{adapter}: does not fit {model} ({first}); recover it first if it was trained on a bundle"
                ) from None
        from ..train.setup import load_tokenizer

        tok, pad_id = load_tokenizer(model_path)  # a bundle's listed, sha256-verified files only
        examples, fmt = load_examples(data, tok, seq_len, fmt=data_format.value)
        result = evaluate(m, examples, pad_id, micro_batch, prec.autocast_dtype)
        result["precision"] = prec.name
        result |= {"model": str(model), "adapter": str(adapter) if adapter else None, "data": str(data),
                   "data_format": fmt, "examples": len(examples)}  # fmt: skip
        if as_json:
            return print_json(result)
        console.print(
            f"{model}{' + ' + str(adapter) if adapter else ''} on {data} ({len(examples)} {fmt} examples, "
            f"{result['tokens']:,} tokens): loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
            f"token accuracy {result['accuracy']:.2%}"
        )
