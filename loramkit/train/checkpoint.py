"""Training checkpoints as safetensors + JSON (never pickle): trained tensors, optimizer, position.

A checkpoint is a directory ``step-NNNNNNN`` written under a temporary name and renamed,
so the newest complete one is always safe to resume from. It holds ``trainable.safetensors``
(the trained tensors by parameter name: LoRA matrices, or every weight of an aligned model),
``optimizer.safetensors`` and ``state.json`` (step, run identity, the optimizer's scalars).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..bundle.fsutil import staged_dir
from ..errors import LoramError

TENSORS_NAME = "trainable.safetensors"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors, JSON rest). Keys: ``state.<param>.<name>``.

    ``<param>`` is the parameter's index (``Optimizer.state_dict``) or its name (FSDP's full
    optimizer state dict); ``<name>`` (``exp_avg``, ``step``, ...) never holds a dot.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)[1].rsplit(".", 1)
        state.setdefault(_param_key(idx), {})[name] = value
    for idx, entry in rest["scalars"].items():
        state.setdefault(_param_key(idx), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def _param_key(idx: str) -> int | str:
    return int(idx) if idx.isdigit() else idx


def save(
    root: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | dict[str, Any],
    meta: dict[str, Any], keep: int = 2,
) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``.

    Args:
        tensors: the trained tensors by name (each distinct: tied parameters once).
        optimizer: an optimizer, or its (full) state dict.
        meta: JSON-serializable run state (identity, tokens seen, loss history).
    """
    # Staged and renamed into place (the same helper as every output): the older checkpoints
    # stay until the new one is whole, so there is never a moment without a valid checkpoint.
    with staged_dir(root / f"step-{step:07d}", overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_NAME))
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        opt_tensors, opt_rest = _flatten_optimizer(opt_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta, "optimizer": opt_rest}, indent=1))
    final = root / f"step-{step:07d}"
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trained tensors, optimizer state_dict, meta) of one checkpoint directory."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / TENSORS_NAME))
        opt = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta.pop("optimizer"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:  # truncated, edited
        raise LoramError(f"{path}: unreadable checkpoint ({exc}); delete it to resume from an earlier one") from None
    return tensors, opt, meta
