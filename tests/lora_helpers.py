"""Shared helpers for the recovery / merge tests: bundles and real PEFT adapters, built once.

``LoramShop(tmp_path_factory, make_base_dir)`` builds (and caches for the whole session)
bundles pruned from the conftest base models and LoRA adapters trained, in the sense of
``get_peft_model(...).save_pretrained``, on ``load_pruned_model(bundle)``. Every cached
directory is READ-ONLY BY CONTRACT, like the base dirs: copy it before changing it
(:func:`copy_dir`).

``init_lora_weights=False`` gives random, non-zero A and B, so every delta is non-trivial.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3 holds q/k/v in one qkv_proj and gate/up in one gate_up_proj (transformers' Phi3Attention / Phi3MLP).
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def targets_of(model_dir: Path) -> list[str]:
    """Every projection of the model in ``model_dir`` (a base or a bundle), by its config's model_type."""
    import json

    return FUSED_TARGETS if json.loads((Path(model_dir) / "config.json").read_text())["model_type"] == "phi3" else TARGETS


# The default LoRAM setup for the 8-layer tiny models: layers 2..6 pruned.
PRUNE_KW: dict[str, Any] = dict(ratio=0.5, keep_first=2, keep_last=1, importance="random", seed=0)
LORA_KW: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

_CACHE: dict[str, Path] = {}


def _key(*parts: Any) -> str:
    return repr(tuple(sorted(p.items()) if isinstance(p, dict) else p for p in parts))


def _lora_config(**kw: Any):
    from peft import LoraConfig

    return LoraConfig(**{**LORA_KW, **kw})


class LoramShop:
    """Session cache of bundles, pruned-model adapters and recovered adapters."""

    def __init__(self, tmp_path_factory, make_base_dir):
        self.tmp = tmp_path_factory
        self.make_base_dir = make_base_dir

    def base(self, case: str, **base_kw: Any) -> Path:
        return self.make_base_dir(case, **base_kw)

    def bundle(self, case: str, base_kw: dict | None = None, **prune_kw: Any) -> Path:
        from loramkit.prune.pruner import prune

        base_kw = base_kw or {}
        kw = {**PRUNE_KW, **prune_kw}
        key = _key("bundle", case, base_kw, kw)
        if key not in _CACHE:
            out = self.tmp.mktemp(f"bundle_{case}", numbered=True) / "bundle"
            ratio = kw.pop("ratio")
            prune(self.base(case, **base_kw), out, ratio, show_progress=False, **kw)
            _CACHE[key] = out
        return _CACHE[key]

    def adapter(self, bundle: Path, *, save_kw: dict | None = None, **lora_kw: Any) -> Path:
        """A LoRA adapter saved by PEFT from ``load_pruned_model(bundle)``."""
        from loramkit.model.loader import load_pruned_model

        save_kw = save_kw or {}
        lora_kw.setdefault("target_modules", targets_of(bundle))
        key = _key("adapter", str(bundle), lora_kw, save_kw)
        if key not in _CACHE:
            from peft import get_peft_model

            out = self.tmp.mktemp("adapter", numbered=True) / "adapter"
            with quiet():
                model = get_peft_model(load_pruned_model(bundle), _lora_config(**lora_kw))
            model.save_pretrained(out, **save_kw)
            _CACHE[key] = out
        return _CACHE[key]

    def _saved(self, kind: str, source: Path, config, load) -> Path:
        from peft import get_peft_model

        key = _key(kind, str(source), repr(config))
        if key not in _CACHE:
            out = self.tmp.mktemp(kind, numbered=True) / "adapter"
            with quiet():
                model = get_peft_model(load(source), config)
            model.save_pretrained(out)
            _CACHE[key] = out
        return _CACHE[key]

    def full_adapter(self, base: Path, config) -> Path:
        """An adapter trained (saved) on the FULL base model, with any PEFT config."""
        from transformers import AutoModelForCausalLM

        return self._saved("full_adapter", base, config, AutoModelForCausalLM.from_pretrained)

    def pruned_adapter_with(self, bundle: Path, config) -> Path:
        """An adapter of any PEFT config (DoRA, IA3, LoHa, ...) on ``load_pruned_model(bundle)``."""
        from loramkit.model.loader import load_pruned_model

        return self._saved("other_adapter", bundle, config, load_pruned_model)

    def recovered(self, adapter: Path, bundle: Path) -> Path:
        from loramkit.recover.adapter import recover_adapter

        key = _key("recovered", str(adapter), str(bundle))
        if key not in _CACHE:
            out = self.tmp.mktemp("recovered", numbered=True) / "out"
            recover_adapter(adapter, out, bundle)
            _CACHE[key] = out
        return _CACHE[key]


# ----------------------------------------------------------------------------- PEFT side


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def strict_warnings() -> Iterator[None]:
    """Every warning is an error, except transformers' own deprecation notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformers(\.|$)")
        yield


def load_base(base: Path, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    with quiet():
        kw = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(base, **kw).eval()


def peft_on_base(base: Path, adapter: Path, dtype: torch.dtype | None = None):
    """``PeftModel.from_pretrained(base model, adapter)``; any warning (missing keys!) fails."""
    from peft import PeftModel

    model = load_base(base, dtype)
    with strict_warnings():
        return PeftModel.from_pretrained(model, adapter).eval()


def expected_lora_state(base: Path, adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of what PEFT itself saves for ``adapter_dir``'s config on the FULL base."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(adapter_dir))
    with quiet():
        model = get_peft_model(load_base(base), config)
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: tuple(v.shape) for k, v in state.items()}


# ----------------------------------------------------------------------------- math / files


def lora_delta(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """``B @ A * scale`` as a fixed-order sum of rank-1 terms, in float32.

    Element-wise ops only, so the result at a coordinate depends on nothing but that
    coordinate's terms: computing it on scattered matrices and on the pruned ones gives
    bitwise comparable numbers (a BLAS matmul may block differently for other shapes).
    """
    b, a = b.float(), a.float()
    acc = b[:, 0:1] * a[0:1, :]
    for k in range(1, a.shape[0]):
        acc = acc + b[:, k : k + 1] * a[k : k + 1, :]
    return acc * scale


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((path / ADAPTER_CONFIG).read_text()), load_file(str(path / ADAPTER_WEIGHTS))


def write_adapter_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


def listing(d: Path) -> list[str]:
    """Every entry under ``d`` (dot-files included), relative, sorted."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def ids(n: int = 2, t: int = 20, vocab: int = 512) -> torch.Tensor:
    return torch.randint(4, vocab, (n, t), generator=torch.Generator().manual_seed(11))


def load_state(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a model directory's safetensors files (any sharding)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def shard_of(d: Path) -> dict[str, str]:
    """tensor name -> the safetensors file (name) holding it."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            out |= {k: f.name for k in s.keys()}
    return out
