"""Model cards (README.md): the bundle's (Hub metadata, what it is, how it was made, how to use it),
and the metadata of any card, through huggingface_hub's ``ModelCard`` / ``ModelCardData`` so the
YAML front matter is what the Hub itself reads and writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .manifest import CARD_NAME

__all__ = ["CARD_NAME", "compose", "render", "tags_of"]


def compose(metadata: dict[str, Any], body: str) -> str:
    """A card from Hub metadata (``ModelCardData`` fields: base_model, tags, license ...) and a Markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    front = ModelCardData(**metadata).to_yaml()  # None values are left out
    return str(ModelCard(f"---\n{front}\n---\n\n{body.lstrip(chr(10))}"))


def tags_of(path: str | Path) -> list[str]:
    """The tags in the metadata of the card at ``path``; [] without a card or metadata.

    Raises:
        ValueError: the metadata block is not valid YAML.
    """
    import yaml
    from huggingface_hub import ModelCard

    path = Path(path)
    if not path.is_file():  # ModelCard.load would take a missing path for a Hub repo id
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    try:
        tags = ModelCard(text).data.tags
    except yaml.YAMLError as exc:
        raise ValueError(f"its metadata is not valid YAML ({str(exc).splitlines()[0]})") from None
    return [str(t) for t in tags or []]


def _py_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid Python string literal


def _size(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def render(manifest: dict[str, Any], repo_id: str | None = None) -> str:
    """The card for ``manifest``; commands name ``repo_id`` when the bundle is published."""
    base = manifest["base"]["name_or_path"]
    pr, params, q, al = manifest["pruning"], manifest["parameters"], manifest.get("quantization"), manifest.get("alignment")
    tags = ["loram", "pruned", "lora", *(["4-bit", "bitsandbytes", q["quant_type"]] if q else [])]
    # The Hub's relations are adapter | merge | quantized | finetune; pruning derives new
    # weights from the base, the nearest of these is finetune.
    relation = "quantized" if q else "finetune"
    metadata = {"base_model": base, "base_model_relation": relation, "library_name": "loramkit",
                "license": manifest["base"].get("license") or None, "tags": tags}  # fmt: skip
    files = manifest.get("files", {})
    weight_bytes = sum(files.get(f, {}).get("size", 0) for f in manifest["weights"]["files"])
    pruned_layers = pr["pruned_layers"]
    layer_text = f"{pruned_layers[0]}-{pruned_layers[-1]}" if pruned_layers else "none"
    here = repo_id or "THIS_BUNDLE"
    sp = manifest.get("sparsity")
    intact = f"(first {pr['keep_first']} and last {pr['keep_last']} intact)"
    if sp:  # spec 7.3: weights zeroed inside the projections, stored as bitmask + kept values
        kind = f"{sp['pattern']} semi-structured" if sp.get("pattern") else "unstructured"
        tags.append("sparse")
        made = [
            f"- pruning: {kind} sparsity of the decoder-layer projections, importance `{pr['importance']}`, ratio {pr['ratio']}, "
            f"layers {layer_text} sparsified {intact}, seed {pr['seed']}; stored compressed (bitmask + kept values)",
        ]
        what = f"An {kind} sparse" if kind == "unstructured" else f"A {kind} sparse"
    else:
        made = [
            f"- pruning: structured (whole KV groups / heads and MLP channels), importance `{pr['importance']}`, "
            f"ratio {pr['ratio']}, layers {layer_text} pruned {intact}, seed {pr['seed']}",
        ]
        what = "A structurally pruned"
    if pr.get("calibration"):
        made.append(f"- calibration: `{pr['calibration']['source']}` ({pr['calibration'].get('num_samples', '?')} samples)")
    if al:
        loss = al.get("heldout_loss")  # null when nothing was held out (spec 7.2)
        corpus = (al.get("corpus") or {}).get("description")
        made.append(f"- alignment: {al.get('tokens_seen', 0):,} tokens of continual pre-training"
                    + (f" on {corpus}" if corpus else "")
                    + (f" (held-out loss {loss['before']:.3f} -> {loss['after']:.3f})" if loss else ""))  # fmt: skip
    if q:
        made.append(
            f"- quantization: decoder-layer Linear weights in bitsandbytes `{q['quant_type']}` (block size {q['blocksize']}"
            f"{', double quantization' if q['double_quant'] else ''}, compute `{q['compute_dtype']}`); embeddings, norms, "
            f"biases and `lm_head` stay 16-bit"
        )
    ratio = params["original"] / params["pruned"]
    storage = f"{ratio * 4:.2f}x (parameters / (pruned / 4))" if q else f"{ratio:.2f}x"
    return compose(
        metadata,
        f"""
# LoRAM bundle of `{base}`

{what}{" and 4-bit quantized" if q else ""} copy of `{base}` for **training LoRA adapters
with far less memory** (LoRAM, "Train Small, Infer Large", ICLR 2025). Train on this bundle, then
recover the adapter onto the original model for inference: every original weight is used at
inference; the pruned weights here serve training only.

| | parameters | weights on disk |
|---|---|---|
| original `{base}` | {params["original"]:,} | |
| this bundle | {params["pruned"]:,} ({params["pruned"] / params["original"]:.1%}) | {_size(weight_bytes)} |

Parameter-storage reduction: {storage}.

## How it was made

{chr(10).join(made)}

## Use it

```bash
pip install loramkit
loramkit train {here} --data train.jsonl --out adapter          # LoRA on the small model
loramkit recover adapter --out adapter-full                      # standard PEFT adapter for {base}
loramkit recover adapter --out adapter-full --merge --base {base} --merged-out merged
```

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({_py_str(base)}), "adapter-full")
```

Bundle `{manifest.get("bundle_id") or "(id set on write)"}`, format {manifest["format_version"]}
(loramkit `specs/bundle-v1.md`); `loramkit validate {here}` checks every file against its sha256.
""",
    )
