"""LoRA on a mixture of experts' fused tensors (PEFT ``target_parameters``): recovery and merge.

transformers holds a layer's experts as two parameters of one module: ``gate_up_proj``
[E, 2I, H] (expert e: gate rows, then up rows) and ``down_proj`` [E, H, I]. PEFT wraps
each targeted parameter in a ``ParamWrapper`` around the module, the first one in the
module's definition order innermost, so the saved keys are ``<experts>.base_layer.lora_A``
(gate_up_proj) and ``<experts>.lora_A`` (down_proj) when both are targeted. Per wrapper,
lora_A is [r * E, in] (expert e owns rows e*r .. e*r+r-1) and lora_B is [out, r * E]
(expert e owns columns j*E + e), and expert e's delta is ``s * B_e @ A_e`` [out, in].

On disk (base checkpoints and bundles) every expert has its own gate_proj / up_proj /
down_proj, with its own index maps: recovery scatters each expert's rows and columns to
its own kept channels, and merge adds each expert's delta to its own tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError
from ..families import ArchSpec

# transformers' Qwen3MoeExperts defines gate_up_proj, then down_proj: PEFT's wrapping order.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_WRAPPED = ".base_layer"


def targeted_params(config: dict[str, Any], arch: ArchSpec, where: Path) -> list[str]:
    """The expert parameters an adapter targets, in wrapping order; refuses other ``target_parameters``."""
    targets = config.get("target_parameters") or []
    experts = arch.family.experts
    if targets and not experts:
        raise AdapterError(
            f"{where}: LoRA on parameters (target_parameters) adapters are unsupported for {arch.architecture}; recover needs plain LoRA"
        )
    names = {t: t.rsplit(".", 1)[-1] for t in targets}
    for t, name in names.items():  # PEFT matches a target as the parameter's full name or a suffix of it
        if name not in EXPERT_PARAMS or not (t == f"{experts}.{name}" or t.endswith(f".{experts}.{name}") or t == name):
            raise AdapterError(f"{where}: target parameter {t} is not an expert tensor ({experts}.gate_up_proj / down_proj)")
    return [p for p in EXPERT_PARAMS if p in names.values()]


def expert_param(module: str, config: dict[str, Any], arch: ArchSpec, where: Path) -> tuple[int, str] | None:
    """(layer, parameter) of a saved key's module ``<layers>.<i>.<experts>[.base_layer]*``; None otherwise."""
    family = arch.family
    if not family.experts:
        return None
    depth = 0
    while module.endswith(_WRAPPED):
        module, depth = module[: -len(_WRAPPED)], depth + 1
    layer = family.layer_of(module)
    if layer is None or module != f"{family.layers_prefix}.{layer}.{family.experts}":
        return None
    params = targeted_params(config, arch, where)
    if depth >= len(params):
        raise AdapterError(f"{where}: {module} is wrapped deeper than its target_parameters allow; the adapter is inconsistent")
    return layer, params[len(params) - 1 - depth]  # the last targeted is outermost


def _expert_maps(arch: ArchSpec, layer: int, maps: dict[str, torch.Tensor], role: str, dim: int) -> list[torch.Tensor] | None:
    """Each expert's kept channels of ``role`` (None when the layer's experts are whole)."""
    got = [maps.get(f"{arch.family.module(layer, role, e)}.weight:{dim}") for e in range(arch.num_experts)]
    return None if all(g is None for g in got) else got


def recover_expert(
    t: torch.Tensor, part: str, layer: int, param: str, arch: ArchSpec, maps: dict[str, torch.Tensor], key: str, where: Path
) -> torch.Tensor:
    """One ParamWrapper lora_A / lora_B of the pruned model at full size, zeros on pruned channels."""
    E, I, H = arch.num_experts, arch.intermediate_size, arch.hidden_size
    if param == "gate_up_proj":  # A: [r*E, H] (hidden, unpruned); B: [2k, r*E], rows [gate | up]
        gate, up = _expert_maps(arch, layer, maps, "gate", 0), _expert_maps(arch, layer, maps, "up", 0)
        k = len(gate[0]) if gate else I
        want = (t.shape[0], H) if part == "lora_A" else (2 * k, t.shape[1])
    else:  # down_proj: A: [r*E, k] (columns: kept channels); B: [H, r*E]
        down = _expert_maps(arch, layer, maps, "down", 1)
        k = len(down[0]) if down else I
        want = (t.shape[0], k) if part == "lora_A" else (H, t.shape[1])
    r_total = t.shape[0] if part == "lora_A" else t.shape[1]
    if tuple(t.shape) != want or r_total % E:
        raise AdapterError(
            f"{where}: {key} has shape {list(t.shape)} but the bundle's kept dims give {list(want)} (x {E} experts); the adapter was trained on another bundle"
        )
    r = r_total // E
    if param == "gate_up_proj" and part == "lora_B" and gate:
        out = torch.zeros(2 * I, r_total, dtype=t.dtype)
        for e in range(E):
            cols = torch.arange(r) * E + e  # expert e's columns of B
            rows = torch.cat([gate[e], I + up[e]])  # its kept gate rows, then its kept up rows
            out[rows[:, None], cols[None, :]] = t[:, cols]
        return out
    if param == "down_proj" and part == "lora_A" and down:
        out = torch.zeros(r_total, I, dtype=t.dtype)
        for e in range(E):
            rows = e * r + torch.arange(r)  # expert e's rows of A
            out[rows[:, None], down[e][None, :]] = t[rows]
        return out
    return t.clone()  # the hidden side, or a layer whose experts are whole


def expert_deltas(
    layer: int, param: str, b: torch.Tensor, a: torch.Tensor, scale: float, arch: ArchSpec
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """Per on-disk expert weight: (B_e, A_e, scale, False), so that its delta is ``scale * B_e @ A_e``."""
    E, I = arch.num_experts, arch.intermediate_size
    r = a.shape[0] // E
    out = {}
    for e in range(E):
        a_e = a.reshape(E, r, a.shape[1])[e]  # (r, in)
        b_e = b.reshape(b.shape[0], r, E)[:, :, e]  # (out, r)
        if param == "gate_up_proj":  # rows [gate | up] of expert e
            out[f"{arch.family.module(layer, 'gate', e)}.weight"] = (b_e[:I], a_e, scale, False)
            out[f"{arch.family.module(layer, 'up', e)}.weight"] = (b_e[I:], a_e, scale, False)
        else:
            out[f"{arch.family.module(layer, 'down', e)}.weight"] = (b_e, a_e, scale, False)
    return out
