"""A random LoRA adapter (r=8, every projection) of a bundle's pruned model, written without loading the model."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loramkit.bundle import Bundle  # noqa: E402
from loramkit.bundle.manifest import bundle_tag  # noqa: E402

bundle, out = Bundle(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
r, tensors = 8, {}
with bundle.weights() as ckpt:
    for name in ckpt.names():
        module = name.removesuffix(".weight")
        if bundle.arch.family.role_of(module) is not None and name.endswith(".weight"):
            o, i = ckpt.info(name).shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, i) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(o, r) * 0.01
save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(bundle.path),
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
(out / "adapter_config.json").write_text(json.dumps(config))
(out / "README.md").write_text(f"---\ntags:\n- {bundle_tag(bundle.bundle_id)}\n---\n")
