"""Build the family's own transformers model with per-layer pruned modules, from a bundle.

transformers builds every layer from one config, so a non-uniform model is made by
building the original architecture on the meta device (no memory), swapping in
smaller Linear modules for the pruned layers, then loading the bundle's tensors
straight into place. Attention stays correct because whole KV groups are pruned, so
H / H_kv is unchanged; where a forward reads the head counts themselves (Phi-3 splits
its fused qkv by ``config.num_attention_heads``), the pruned layer's attention gets its
own counts (module attributes and a per-layer view of the config).

A sparse bundle (unstructured or N:M, spec 7.3) keeps every shape: its pruned projections
become compressed Linears holding the stored mask and kept values (:mod:`loramkit.model.sparse`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..bundle import Bundle
from ..bundle.manifest import bundle_tag
from ..bundle.safetensors_io import DTYPES
from ..errors import BundleError
from ..families.geometry import LayerDims, expert_part, expert_source, pruned_shape

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None, bundle: Bundle) -> torch.dtype:
    if dtype in (None, "auto"):
        name = bundle.manifest["weights"]["dtype"]
        return _DTYPE_NAMES.get(name, torch.float32)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise BundleError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}") from None


def _compute_dtype(requested: str | torch.dtype | None, recorded: str, device: str | torch.device) -> torch.dtype:
    """The 4-bit layers' compute dtype: as requested, or the recorded one where it is native."""
    want = _DTYPE_NAMES.get(recorded, torch.float32)
    if requested == "bundle":
        return want
    if requested not in (None, "auto"):
        return requested if isinstance(requested, torch.dtype) else _resolve_dtype(requested, None)
    dev = torch.device(device)
    if want == torch.float32 or (want == torch.float16 and dev.type == "cuda"):
        return want
    if want == torch.bfloat16:
        from ..precision import resolve_precision

        if resolve_precision("auto", dev).name == "bf16-mixed":
            return want
    return torch.float32


def _shrink_layer(model: nn.Module, bundle: Bundle, dims: LayerDims, shapes: dict[str, tuple[int, ...]]) -> None:
    """Replace the Linear modules of one pruned layer with ones of the bundle's shapes (on meta)."""
    family = bundle.arch.family
    for path in family.projections(dims.index):
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        old: nn.Linear = getattr(parent, attr)
        out_f, in_f = shapes[f"{path}.weight"]
        new = nn.Linear(in_f, out_f, bias=old.bias is not None, device="meta", dtype=old.weight.dtype)
        setattr(parent, attr, new)
    if family.experts:  # fused expert tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I], at the kept I
        experts = model.get_submodule(f"{family.layers_prefix}.{dims.index}.{family.experts}")
        k = dims.intermediate[1]
        E, _, H = experts.gate_up_proj.shape
        meta = dict(device="meta", dtype=experts.gate_up_proj.dtype)
        experts.gate_up_proj = nn.Parameter(torch.empty(E, 2 * k, H, **meta))
        experts.down_proj = nn.Parameter(torch.empty(E, H, k, **meta))
        experts.intermediate_dim = k
    else:
        mlp = model.get_submodule(family.module(dims.index, "gate").rsplit(".", 1)[0])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = dims.intermediate[1]
    # Head counts an attention forward may read: its own attributes, or the shared config
    # (Phi-3 splits qkv at config.num_attention_heads * head_dim).
    attn = model.get_submodule(family.module(dims.index, "o").rsplit(".", 1)[0])
    heads = {"num_attention_heads": dims.heads[1], "num_key_value_heads": dims.kv_heads[1]}
    for attr, value in (("num_heads", dims.heads[1]), ("num_key_value_heads", dims.kv_heads[1])):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    if getattr(attn, "config", None) is not None:
        attn.config = LayerConfig(attn.config, heads)


def _load_expert_slice(model: nn.Module, b: Bundle, ckpt, name: str, device, dtype: torch.dtype) -> str | None:
    """Copy one stored expert weight into its slice of transformers' fused expert parameter.

    Returns the fused parameter's name, or None for a name that is no expert weight.
    """
    source = expert_source(b.arch, name)
    if source is None:
        return None
    fused_name, expert, role = source
    parent_path, attr = fused_name.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    fused = getattr(parent, attr)
    if fused.is_meta:  # allocated once, filled expert by expert: never two copies of a layer's experts
        fused = nn.Parameter(torch.empty(fused.shape, device=device, dtype=dtype), requires_grad=fused.requires_grad)
        setattr(parent, attr, fused)
    target = expert_part(fused.data, expert, role)
    info = ckpt.info(name)
    if tuple(target.shape) != info.shape:
        raise BundleError(f"{b.path}: {name} has shape {list(info.shape)}, the manifest implies {list(target.shape)}")
    target.copy_(ckpt.get(name))
    return fused_name


class LayerConfig:
    """The model's config as one pruned layer sees it: its own head counts, all else shared and live."""

    def __init__(self, shared: object, own: dict[str, int]) -> None:
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_own", dict(own))

    def __getattr__(self, name: str):  # only called for names not set on the instance
        if name.startswith("__") or name in ("_shared", "_own"):  # copy/pickle probes before __init__
            raise AttributeError(name)
        return self._own[name] if name in self._own else getattr(self._shared, name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._shared, name, value)


def load_pruned_model(
    bundle: str | Path | Bundle,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    verify: bool = True,
    attn_implementation: str | None = None,
    compute_dtype: str | torch.dtype | None = "auto",
    sparse: str = "compressed",
) -> nn.Module:
    """Load a bundle's pruned model as the family's ``*ForCausalLM``.

    Works with ``generate()``, the HF Trainer and ``peft.get_peft_model``. The model's
    ``name_or_path`` is the bundle's path and its tags name the bundle, so an adapter
    trained on it with plain PEFT records which bundle it belongs to.

    A 4-bit bundle (format 1.1, ``quantization``) loads its quantized Linears as
    ``bitsandbytes.nn.Linear4bit`` straight from the stored 4-bit state (never a
    full-precision weight); the model is marked ``is_loaded_in_4bit`` so PEFT gives it bnb
    LoRA layers.

    A sparse bundle (format 1.2, ``sparsity``) loads each listed projection as a
    :class:`~loramkit.model.sparse.SparseLinear` holding its stored mask and kept values
    (never a dense weight at rest; each forward and backward expands it transiently).

    Args:
        dtype: ``"auto"`` (the bundle's), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype;
            for a 4-bit bundle, the dtype of the tensors not stored in 4 bits.
        compute_dtype: what a 4-bit bundle's layers compute in. ``"auto"``: the manifest's
            ``compute_dtype`` where ``device`` computes it natively, else float32 (bf16 is
            emulated, 15-20x slower, on CPUs without AVX512-BF16/AMX); ``"bundle"``: the
            manifest's whatever the hardware; or a dtype.
        verify: check the weight files against the manifest's sha256 first.
        sparse: how a sparse bundle's projections load: ``"compressed"`` (mask + values) or
            ``"dense"`` (zero-filled ``nn.Linear``, the paper's way: the same model, a dense
            weight's memory; for comparisons such as bench/sparse_memory.py).

    Example:
        >>> model = load_pruned_model("llama-loram-0.85", dtype="bfloat16")
    """
    import transformers

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    if sparse not in ("compressed", "dense"):
        raise ValueError(f"sparse={sparse!r}: use 'compressed' or 'dense'")
    if verify:
        b.verify_weights()
    torch_dtype = _resolve_dtype(dtype, b)
    config = transformers.AutoConfig.from_pretrained(b.verify_file("config.json").parent)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if b.arch.num_experts and torch_dtype == torch.float64:  # transformers' grouped_mm experts have no float64
        model.config._experts_implementation = "eager"
    if type(model).__name__ not in b.arch.family.architectures:
        raise BundleError(f"{b.path}: config builds {type(model).__name__}, expected {b.arch.architecture}")

    # Shapes come from the manifest (base shapes cut by the verified index maps); the weight
    # files' headers must then agree, so a file cannot resize the model on its own.
    maps = b.index_maps
    shapes = {n: pruned_shape(tuple(t["shape"]), n, maps) for n, t in b.base["tensors"].items()}
    quantization = b.manifest.get("quantization")
    if quantization is not None and b.sparsity is not None:
        raise BundleError(f"{b.path}: a bundle is either 4-bit or sparse, this manifest says both; re-create the bundle")
    with b.weights() as ckpt:
        for dims in b.layers:
            if dims.pruned:
                _shrink_layer(model, b, dims, shapes)
        done: set[str] = set()
        if quantization is not None:  # 4-bit Linears first, straight from their stored state
            from ..quant.load import load_4bit_linears

            compute = _compute_dtype(compute_dtype, quantization["compute_dtype"], device)
            done = load_4bit_linears(model, b, ckpt, shapes, device, torch_dtype, compute)
        if b.sparsity is not None:  # compressed Linears, straight from their mask and values
            from ..memory import return_large_blocks_to_os
            from .sparse import load_sparse_linears

            # Each forward expands weights into tensor-sized transients; from glibc's heap they
            # fragment it and the peak ratchets up (bench/sparse_memory.py: ~375 MiB on a 1B model).
            return_large_blocks_to_os()
            done = load_sparse_linears(model, b, ckpt, shapes, device, torch_dtype, dense=sparse == "dense")
        expected = dict(model.named_parameters())
        filled: dict[str, int] = {}  # fused expert tensor -> expert slices loaded into it
        for name in ckpt.names():
            if name in done:
                continue
            fused = _load_expert_slice(model, b, ckpt, name, device, torch_dtype) if name not in expected else None
            if fused is not None:
                filled[fused] = filled.get(fused, 0) + 1
                continue
            if name not in expected:
                raise BundleError(f"{b.path}: weight {name} does not belong to {b.arch.architecture}")
            info = ckpt.info(name)
            if tuple(expected[name].shape) != info.shape:
                raise BundleError(
                    f"{b.path}: {name} has shape {list(info.shape)}, the manifest implies {list(expected[name].shape)}"
                )
            tensor = ckpt.get(name).to(device=device, dtype=torch_dtype if DTYPES[info.dtype].is_floating_point else None)
            parent_path, attr = name.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            setattr(parent, attr, nn.Parameter(tensor, requires_grad=getattr(parent, attr).requires_grad))
    for fused, n in filled.items():  # gate and up fill gate_up_proj: two slices per expert
        if n != b.arch.num_experts * (2 if fused.endswith("gate_up_proj") else 1):
            raise BundleError(f"{b.path}: the bundle's weights lack experts of {fused}; re-create the bundle")
    if b.arch.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) are not in checkpoints: rebuild them for real.
    for path, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_path, _, attr = path.rpartition(".")
            fresh = type(module)(config=model.config).to(device)
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, fresh)
        elif hasattr(module, "scalar_embed_scale") and module.embed_scale.is_meta:  # Gemma: sqrt(hidden) scale
            module.embed_scale = torch.full_like(module.embed_scale, module.scalar_embed_scale, device=device)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise BundleError(f"{b.path}: the bundle's weights lack {leftover[0]}; re-create the bundle")
    model.to(device)
    model.eval()
    if quantization is not None:
        from ..quant.layers import mark_4bit, use_safe_cpu_kernels

        use_safe_cpu_kernels(model)
        mark_4bit(model)
    path = str(b.path.resolve())
    model.name_or_path = path
    model.config._name_or_path = path
    model.add_model_tags(["loram", bundle_tag(b.bundle_id)])
    return model


def load_model(
    path: str | Path, *, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
    compute_dtype: str | torch.dtype | None = "auto",
) -> nn.Module:  # fmt: skip
    """A bundle's pruned model, or an ordinary transformers model directory (safetensors only).

    ``compute_dtype`` applies to a 4-bit bundle's layers (see :func:`load_pruned_model`).
    """
    from ..bundle.manifest import MANIFEST_NAME
    from ..errors import BaseModelError

    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return load_pruned_model(path, dtype=dtype, device=device, compute_dtype=compute_dtype)
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path}: neither a LoRAM bundle nor a model directory with config.json")
    import transformers

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else (_DTYPE_NAMES.get(dtype) if dtype != "auto" else "auto")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{path}: cannot load the model ({exc})") from None
    return model.to(device).eval()
