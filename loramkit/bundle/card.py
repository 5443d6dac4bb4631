"""The bundle's model card (README.md): YAML front matter + what the bundle is and how to use it."""

from __future__ import annotations

from typing import Any

from .manifest import CARD_NAME

__all__ = ["CARD_NAME", "render"]


def render(manifest: dict[str, Any]) -> str:
    base = manifest["base"]["name_or_path"]
    pr = manifest["pruning"]
    params = manifest["parameters"]
    q = manifest.get("quantization")
    tags = ["loram", "pruned", "lora", *(["4-bit", "bitsandbytes", q["quant_type"]] if q else [])]
    front = "\n".join(
        ["---", f"base_model: {base}", "library_name: loramkit", "tags:", *(f"- {t}" for t in tags), "---"]
    )
    pruned = ", ".join(str(i) for i in pr["pruned_layers"]) or "none"
    return f"""{front}

# LoRAM bundle of `{base}`

A structurally pruned copy of `{base}` for **training LoRA adapters with less memory**
(LoRAM, "Train Small, Infer Large", ICLR 2025). Train on this bundle, then recover the
adapter onto the original model for inference: the pruned weights are never used at
inference time.

| | parameters |
|---|---|
| original | {params['original']:,} |
| pruned | {params['pruned']:,} ({params['pruned'] / params['original']:.1%}) |

Pruning: structured, importance `{pr['importance']}`, ratio {pr['ratio']}, seed {pr['seed']};
layers pruned: {pruned}.{_quantized(manifest)}

```bash
# train a LoRA adapter on the pruned model (plain PEFT works too: loramkit.load_pruned_model)
# then map it onto the original model:
loramkit recover ADAPTER --bundle THIS_BUNDLE --out recovered-adapter
```

The format is specified in loramkit's `specs/bundle-v1.md`; `loramkit validate` checks a copy.
"""


def _quantized(manifest: dict[str, Any]) -> str:
    q = manifest.get("quantization")
    if not q:
        return ""
    dq = ", double quantization" if q["double_quant"] else ""
    return (
        f"\n\nQLoRAM: the decoder layers' Linear weights are stored in 4 bits (bitsandbytes `{q['quant_type']}`, "
        f"blocksize {q['blocksize']}{dq}; compute dtype `{q['compute_dtype']}`); embeddings, norms, biases and "
        f"`lm_head` stay `{manifest['weights']['dtype']}`. `loramkit.load_pruned_model` loads them as "
        "`bitsandbytes.nn.Linear4bit`."
    )
