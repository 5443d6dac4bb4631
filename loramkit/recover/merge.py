"""Merge a full-model LoRA adapter into the base weights, streaming tensor by tensor.

Peak memory: one adapted base tensor (plus its fp32 copy while the delta is added) and
the adapter; unadapted tensors (embeddings, norms) are copied in 64 MiB chunks. Every base tensor read is checked against the bundle's weight fingerprint,
so merging into a different model than the one the bundle was pruned from is refused.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..bundle import Bundle
from ..bundle.fsutil import check_out_clear, staged_dir
from ..bundle.hashing import config_sha256
from ..bundle.model_dir import INDEX_NAME, TOKENIZER_FILES, Checkpoint
from ..bundle.safetensors_io import StreamingWriter, tensor_sha256
from ..errors import AdapterError, BaseModelError
from ..families import ArchSpec
from ..memory import return_large_blocks_to_os
from .adapter import _KEY, Adapter, check_peft_rules, check_plain_lora
from .experts import expert_deltas, expert_param, targeted_params


def _scaling(config: dict[str, Any], module: str, r: int) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA, alpha_pattern applied."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _deltas(adapter: Adapter, arch: ArchSpec | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """weight name -> (B, A, scaling, is_embedding); ``arch`` for LoRA on expert tensors (target_parameters)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{adapter.path}: tensor {key} is not a LoRA A/B matrix; cannot merge it")
        parts.setdefault(m["module"], {})[m["part"]] = t
    out = {}
    for module, p in parts.items():
        emb = "lora_embedding_A" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise AdapterError(f"{adapter.path}: {module} lacks its A or B matrix")
        expert = expert_param(module, adapter.config, arch, adapter.path) if arch is not None else None
        if expert is not None:  # a ParamWrapper on fused experts: lora_A is [r * E, in]
            scale = _scaling(adapter.config, module, a.shape[0] // arch.num_experts)
            out |= expert_deltas(*expert, b, a, scale, arch)
            continue
        out[f"{module}.weight"] = (b, a, _scaling(adapter.config, module, a.shape[0]), emb)
    return out


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    bundle: Bundle | None = None,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write ``base + adapter`` to ``out_dir`` in the base's dtype and shard layout.

    ``adapter_dir`` is a full-model adapter (the output of recover). With ``bundle``,
    the base must be the bundle's base: config digest and every tensor's sha256.
    """
    return_large_blocks_to_os()
    adapter = Adapter.read(adapter_dir)
    check_plain_lora(adapter.config, adapter.path)
    check_peft_rules(adapter)
    if adapter.config.get("fan_in_fan_out"):
        raise AdapterError(f"{adapter.path}: fan_in_fan_out adapters (GPT-2 Conv1D) are unsupported")
    base_dir = Path(base_dir)
    check_out_clear(out_dir, [base_dir, adapter.path, bundle.path if bundle else None])
    with Checkpoint(base_dir) as ckpt:
        arch = None
        if adapter.config.get("target_parameters"):  # only a mixture of experts' expert tensors
            arch = ArchSpec.from_config(ckpt.config)
            targeted_params(adapter.config, arch, adapter.path)
        deltas = _deltas(adapter, arch)
        fingerprint = bundle.base["tensors"] if bundle else None
        if bundle is not None:
            if config_sha256(ckpt.config) != bundle.base["config_sha256"]:
                raise BaseModelError(
                    f"{base_dir}: config.json differs from the base the bundle was pruned from "
                    f"({bundle.base['name_or_path']}); pass that model as --base"
                )
            if set(ckpt.names()) != set(fingerprint):
                raise BaseModelError(f"{base_dir}: its tensors differ from the bundle's base; pass {bundle.base['name_or_path']}")
        names = set(ckpt.names())
        for w, (b, a, _, emb) in deltas.items():
            if w not in names:
                raise AdapterError(f"{adapter.path}: adapted weight {w} is not stored in the base (tied?); cannot merge")
            out_f, in_f = ckpt.info(w).shape
            want_a, want_b = ((a.shape[0], out_f), (in_f, b.shape[1])) if emb else ((a.shape[0], in_f), (out_f, b.shape[1]))
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterError(f"{adapter.path}: adapter for {w} does not fit the base's shape {[out_f, in_f]}")

        total = sum(ckpt.info(n).nbytes for n in names)
        inputs = [base_dir, adapter.path, bundle.path if bundle else None]
        with (
            staged_dir(out_dir, overwrite, inputs=inputs, need_bytes=total) as tmp,
            progress.task("merging", total, show=show_progress) as advance,
        ):
            for fname, reader in ckpt.readers.items():
                entries = [(n, i.dtype, i.shape) for n, i in reader.tensors.items()]
                writer = StreamingWriter(tmp / fname, entries, reader.metadata or {"format": "pt"})
                try:
                    for n, _, _ in entries:
                        if n in deltas:
                            t = reader.get(n)
                            digest = tensor_sha256(t)
                            b, a, s, emb = deltas[n]
                            w32 = t.float()
                            # In place, fp32, one rounding: W += s * B @ A, (out, r) @ (r, in);
                            # embeddings store (num_embeddings, dim), so there it is s * A^T @ B^T.
                            if emb:
                                w32.addmm_(a.float().T, b.float().T, alpha=s)
                            else:
                                w32.addmm_(b.float(), a.float(), alpha=s)
                            merged = w32.to(t.dtype)
                            if not bool(torch.isfinite(merged).all()):  # finite inputs can still overflow (fp16)
                                raise AdapterError(
                                    f"{adapter.path}: merging gives non-finite values in {n}; the adapter is unusable on this base"
                                )
                            writer.write(n, merged)
                            del t, w32, merged
                        else:  # unadapted: copied in chunks, never whole in memory
                            h = hashlib.sha256()
                            writer.copy_from(reader, n, h.update)
                            digest = h.hexdigest()
                        if fingerprint is not None and digest != fingerprint[n]["sha256"]:
                            raise BaseModelError(
                                f"{base_dir}: tensor {n} differs from the bundle's base "
                                f"({bundle.base['name_or_path']}); pass the model the bundle was pruned from"
                            )
                        advance(reader.tensors[n].nbytes)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            for name in ("config.json", INDEX_NAME, *TOKENIZER_FILES):
                if (base_dir / name).is_file():
                    shutil.copyfile(base_dir / name, tmp / name)
    return {"merged_modules": len(deltas), "files": len(ckpt.files)}
