"""The bundle's model card (README.md): YAML front matter + what the bundle is and how to use it."""

from __future__ import annotations

from typing import Any

from .manifest import CARD_NAME

__all__ = ["CARD_NAME", "render"]


def render(manifest: dict[str, Any]) -> str:
    base = manifest["base"]["name_or_path"]
    pr = manifest["pruning"]
    params = manifest["parameters"]
    tags = ["loram", "pruned", "lora"]
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
layers pruned: {pruned}.

```bash
# train a LoRA adapter on the pruned model (plain PEFT works too: loramkit.load_pruned_model)
# then map it onto the original model:
loramkit recover ADAPTER --bundle THIS_BUNDLE --out recovered-adapter
```

The format is specified in loramkit's `specs/bundle-v1.md`; `loramkit validate` checks a copy.
"""
