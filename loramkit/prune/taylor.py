"""First-order Taylor importance, sum of |w * dL/dw| over each coupled group.

Memory: the base model's weights (in their dtype, on ``device``) + activations of one
calibration micro-batch + the gradient of ONE parameter at a time: each gradient is
reduced to per-unit scores the moment autograd finishes it, then freed. Only the
projections of pruned layers get gradients at all. For a 7B model in bf16 that is
about 14 GB + activations, against ~80 GB for the naive all-gradients approach.

Because gradients do not outlive their micro-batch, scores are summed per micro-batch:
sum_b |w * dL_b/dw| with L_b the mean loss of micro-batch b (default 4 texts), not
|w * dL/dw| of one gradient over the whole set as LLM-Pruner computes it. The two agree
when the calibration set is one micro-batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import LoramError
from ..families import ATTENTION_ROLES, MLP_ROLES, ArchSpec
from .importance import unit_sums


def read_calibration(path: Path) -> tuple[list[str], str]:
    """Texts of a calibration file (.txt: blank-line separated passages; .jsonl: 'text'), and its sha256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LoramError(f"{path}: cannot read calibration file ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    raise LoramError(f"{path}:{n}: not a JSON line") from None
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    texts.append(row["text"])
    else:
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not texts:
        raise LoramError(f"{path}: no calibration text found (.txt passages or .jsonl rows with 'text')")
    return texts, hashlib.sha256(raw).hexdigest()


def taylor_scores(
    base_dir: Path,
    arch: ArchSpec,
    layers: list[int],
    texts: list[str],
    *,
    num_samples: int = 32,
    seq_len: int = 256,
    micro_batch: int = 4,
    device: str = "cpu",
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Per pruned layer (kv_group_scores, channel_scores), and a record of the calibration used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise LoramError(f"{base_dir}: taylor importance needs the base's tokenizer files ({exc})") from None
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", device_map=device)
    model.eval()  # no dropout: scores must not depend on it
    for p in model.parameters():
        p.requires_grad_(False)

    kv_acc = {i: torch.zeros(arch.num_key_value_heads, dtype=torch.float64) for i in layers}
    ch_acc = {i: torch.zeros(arch.intermediate_size, dtype=torch.float64) for i in layers}
    params = dict(model.named_parameters())
    hooks = []
    for i in layers:
        for roles, acc in ((ATTENTION_ROLES, kv_acc[i]), (MLP_ROLES, ch_acc[i])):
            for role, dim, _ in roles:
                module = arch.family.module(i, role)
                for name, d in ((f"{module}.weight", dim), (f"{module}.bias", 0)):
                    p = params.get(name)
                    if p is None or (name.endswith(".bias") and dim != 0):
                        continue
                    p.requires_grad_(True)

                    def reduce(param: torch.Tensor, d: int = d, acc: torch.Tensor = acc) -> None:
                        score = (param.detach().float() * param.grad.float()).abs()
                        acc += unit_sums(score, d, acc.numel()).cpu()
                        param.grad = None  # only one gradient alive at a time

                    hooks.append(p.register_post_accumulate_grad_hook(reduce))

    ids = [tok(t, truncation=True, max_length=seq_len, add_special_tokens=True)["input_ids"] for t in texts[:num_samples]]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise LoramError("calibration texts tokenize to fewer than 2 tokens each; give longer texts")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_tokens = 0
    for start in range(0, len(ids), micro_batch):
        batch = ids[start : start + micro_batch]
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # padding never counts
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        n_tokens += int(mask.sum())
        if not hooks:  # no layer is pruned (ratio 0, or keep_first + keep_last >= L): nothing to score
            continue
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
    for h in hooks:
        h.remove()
    del model
    record = {"num_samples": len(ids), "num_tokens": n_tokens, "seq_len": seq_len}
    return {i: (kv_acc[i], ch_acc[i]) for i in layers}, record
