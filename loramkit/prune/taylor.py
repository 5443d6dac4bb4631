"""First-order Taylor importance as LLM-Pruner's ``param_first``: sum over a unit's group of |w * dL/dw|.

L is the mean next-token loss over every calibration token, so g = dL/dw is ONE gradient
over the whole calibration set (micro-batch gradients are summed before the product), and
a unit's score sums |w * g| over its coupled group: for a KV group, the q rows of its G
query heads, the k and v rows of its key/value head (and their biases), the o columns of
its query heads; for an MLP channel, its gate row, up row and down column.

The layer-streamed engine (:mod:`loramkit.prune.calibration`) computes g one decoder layer
at a time. :func:`whole_model_taylor_scores` computes the same scores the simple way, with
the whole model in memory: kept as the reference the tests and the benchmark compare with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..families import ATTENTION_ROLES, MLP_ROLES, ArchSpec
from ..families.geometry import expert_channel_sums
from .importance import group_scores

if TYPE_CHECKING:
    from .calibration import Calibration

DEFINITION = (
    "LLM-Pruner param_first: sum over the unit's coupled group of |w * dL/dw|, "
    "L the mean next-token loss over all calibration tokens"
)


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(rows, T) -> (rows, T): position t predicts token t + 1; the last position predicts nothing (-100).

    Aligned with the positions, the logits need no shifted copy (at a 128k vocabulary that
    copy is as large as the logits) and any span of positions has its own targets.
    """
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of ``logits`` (rows, T, V) for ``targets`` (rows, T), in at least fp32."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # as transformers computes the loss
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def taylor_group_scores(
    arch: ArchSpec, layer: int, params: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_group_scores (H_kv,), channel_scores (I,), or (E, I) for experts) float64 from ``{tensor name: (w, dL/dw)}``."""

    def elementwise(name: str) -> torch.Tensor | None:
        if name not in params:
            return None
        w, g = params[name]
        return (w.to(g.dtype) * g).abs().cpu()

    kv, ch = group_scores(arch, layer, elementwise)
    if arch.num_experts:  # each expert's channels, from transformers' fused expert tensors: (E, I)
        prefix = f"{arch.family.layers_prefix}.{layer}.{arch.family.experts}."
        fused = {p: elementwise(prefix + p) for p in ("gate_up_proj", "down_proj")}
        ch = expert_channel_sums(arch, {p: s for p, s in fused.items() if s is not None})
    return kv, ch


def whole_model_taylor_scores(
    base_dir: Path,
    arch: ArchSpec,
    layers: list[int],
    calib: Calibration,
    *,
    micro_batch: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The same scores as the engine's, with the whole model loaded (memory: the model + the gradients).

    Gradients accumulate in ``.grad`` over the micro-batches; each micro-batch's loss is its
    summed token losses over the total count of predicted tokens, so the sum is dL/dw.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    scored: list[str] = []
    for i in layers:
        for role, dim, _ in ATTENTION_ROLES + MLP_ROLES:
            if arch.family.per_expert(role):  # in memory: the layer's fused expert tensors
                scored += [f"{arch.family.layers_prefix}.{i}.{arch.family.experts}.{p}" for p in ("gate_up_proj", "down_proj")]
                continue
            module = arch.family.module(i, role)
            scored += [n for n in (f"{module}.weight", f"{module}.bias" if dim == 0 else "") if n in params]
    scored = list(dict.fromkeys(scored))  # a fused module (Phi-3 qkv_proj) once
    for n in scored:
        params[n].requires_grad_(True)
    predicted = calib.num_samples * (calib.seq_len - 1)
    if scored:
        for start in range(0, calib.num_samples, micro_batch):
            ids = calib.ids[start : start + micro_batch].to(device)
            loss = token_loss_sum(model(input_ids=ids, use_cache=False).logits, next_token_targets(ids)) / predicted
            loss.backward()
            del loss
    out = {}
    for i in layers:
        named = {n: (params[n].detach(), params[n].grad) for n in scored if arch.family.layer_of(n.rsplit(".", 1)[0]) == i}
        out[i] = taylor_group_scores(arch, i, named)
    return out
