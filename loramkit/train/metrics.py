"""Held-out loss, perplexity and token accuracy: shared by ``train`` and ``eval``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list, pad_id: int, micro_batch: int = 8, autocast_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Token-weighted loss over every labelled token, its perplexity and next-token accuracy.

    ``autocast_dtype``: bf16/fp16 autocast around the forward (logits are upcast to fp32).
    """
    from .data import collate

    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), micro_batch):
        batch = collate(examples[start : start + micro_batch], pad_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits, target = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
        keep = target != -100
        loss_sum += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        correct += int((logits[keep].argmax(-1) == target[keep]).sum())
        count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "tokens": 0}
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": correct / count, "tokens": count}
