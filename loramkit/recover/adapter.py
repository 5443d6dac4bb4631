"""Recovery: a PEFT LoRA adapter of the pruned model -> a PEFT LoRA adapter of the original model.

For a module with kept output rows ``o`` and kept input columns ``i``:
``B_full[o] = B``, ``A_full[:, i] = A``, zeros elsewhere. Then
``B_full @ A_full * s`` equals the pruned delta exactly on the kept coordinates and is
zero elsewhere; r, alpha and every other LoRA setting carry over unchanged.

A sparse bundle (unstructured or N:M, spec 7.3) keeps every dimension, so it has no index
maps and its adapter already has the base's shapes: recovery only rebinds it to the ORIGINAL
base (config and card name the base, the bundle tag goes), checking every tensor's shape
against the base's and writing the tensors bitwise unchanged. Its delta reaches the pruned
weights too; that is the paper's recovery for LoRAM-Semi / LoRAM-Unst (merged into the dense
original).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bundle import Bundle
from ..bundle.card import compose as compose_card
from ..bundle.card import tags_of as card_tags_of
from ..bundle.fsutil import check_out_clear, read_json, staged_dir, write_json
from ..bundle.manifest import ADAPTER_RECORD_NAME as ADAPTER_RECORD
from ..bundle.manifest import BUNDLE_TAG_PREFIX, MANIFEST_NAME, bundle_tag
from ..errors import AdapterError, BundleError
from .experts import expert_param, recover_expert, targeted_params

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT's saved keys: <prefix><module>.<lora part>.weight (the adapter name is stripped on save).
# Embedding parts are ParameterDict entries, saved without ".weight" (..embed_tokens.lora_embedding_A).
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<part>lora_[AB](?=\.weight$)|lora_embedding_[AB](?=$))(?:\.weight)?$")
# LoRA options that change what the weights mean; recovery cannot scatter these.
# (target_parameters: only a mixture of experts' fused expert tensors, see recover/experts.py.)
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "layer_replication": "layer replication",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens",
}


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk: its config and tensors (small: read whole)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tags: list[str]
    record: dict[str, Any] | None  # loram_adapter.json, written by `loramkit train`

    @classmethod
    def read(cls, path: str | Path) -> Adapter:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"{path}: no such adapter directory")
        config = read_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG, AdapterError)
        weights = path / ADAPTER_WEIGHTS
        if not weights.exists():
            pickled = (path / "adapter_model.bin").exists()
            raise AdapterError(
                f"{path}: no {ADAPTER_WEIGHTS}"
                + (
                    "; adapter_model.bin is a pickle, which loramkit never loads: save with safe_serialization=True"
                    if pickled
                    else ""
                )
            )
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{weights}: unreadable safetensors ({exc}); re-save the adapter") from None
        record_path = path / ADAPTER_RECORD
        record = read_json(record_path, ADAPTER_RECORD, AdapterError) if record_path.is_file() else None
        return cls(path, config, tensors, _card_tags(path / "README.md"), record)


def _card_tags(card: Path) -> list[str]:
    """Bundle tags in the adapter's model card (PEFT copies the base model's tags there)."""
    try:
        return [t for t in card_tags_of(card) if t.startswith(BUNDLE_TAG_PREFIX)]
    except ValueError as exc:
        raise AdapterError(f"{card}: {exc}; fix or remove the card") from None


def check_plain_lora(config: dict[str, Any], where: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{where}: a {peft_type or 'non-PEFT'} adapter is unsupported; recover needs a plain LoRA adapter")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{where}: {what} adapters are unsupported; recover needs plain LoRA")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _peft_accepts(config: dict[str, Any], where: Path) -> None:
    """PEFT's own LoraConfig checks (its __post_init__), as one line."""
    import dataclasses

    import peft

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init}
    try:
        peft.LoraConfig(**{k: v for k, v in config.items() if k in fields})
    except Exception as exc:  # PEFT raises ValueError, TypeError, ... for what it refuses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterError(f"{where}: PEFT refuses {ADAPTER_CONFIG} ({first})") from None


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def _targeted(target: Any, module: str) -> bool:
    """PEFT's rule (check_target_module_exists): a string is a full-match regex, a list matches
    a module by its name or a dotted suffix."""
    if isinstance(target, str):
        return target == "all-linear" or re.fullmatch(target, module) is not None
    return module in target or any(module.endswith(f".{t}") for t in target)


def check_peft_rules(adapter: Adapter) -> None:
    """What PEFT needs to load the adapter we would write, checked before recovery: r,
    lora_alpha and their patterns finite numbers (r a positive integer), every LoRA tensor's
    rank the configured one, every tensor's module targeted and every listed target adapted,
    and every value finite.

    Raises:
        AdapterError: the first rule broken, naming the key or module.
    """
    c, where = adapter.config, adapter.path
    r, alpha = c.get("r", 8), c.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = (c.get(k) if c.get(k) is not None else {} for k in ("rank_pattern", "alpha_pattern"))
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError(f"{where}: rank_pattern and alpha_pattern must be objects in {ADAPTER_CONFIG}")
    for name, v in [("r", r), *((f"rank_pattern[{k!r}]", v) for k, v in rank_pattern.items())]:
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise AdapterError(f"{where}: {name} in {ADAPTER_CONFIG} must be a positive integer, not {v!r}")
    for name, v in [("lora_alpha", alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items())]:
        if not _is_number(v):
            raise AdapterError(f"{where}: {name} in {ADAPTER_CONFIG} must be a finite number, not {v!r}")
    dropout = c.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise AdapterError(f"{where}: lora_dropout in {ADAPTER_CONFIG} must be a number in [0, 1), not {dropout!r}")
    if c.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save adapters are unsupported (full copies of modules); recover needs plain LoRA"
        )
    if c.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{where}: bias={c.get('bias')!r} adapters are unsupported; recover needs plain LoRA (bias 'none')")
    layers = c.get("layers_to_transform")
    if not (layers is None or _is_index(layers) or (isinstance(layers, list) and all(_is_index(i) for i in layers))):
        raise AdapterError(
            f"{where}: layers_to_transform in {ADAPTER_CONFIG} must be a layer index or a list of them, not {layers!r}"
        )
    pattern = c.get("layers_pattern")
    if not (
        pattern is None or isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(x, str) for x in pattern))
    ):
        raise AdapterError(f"{where}: layers_pattern in {ADAPTER_CONFIG} must be a name or a list of names, not {pattern!r}")
    _peft_accepts(c, where)
    target = c.get("target_modules")
    if not (isinstance(target, str) or (isinstance(target, list) and target and all(isinstance(t, str) for t in target))):
        raise AdapterError(f"{where}: target_modules in {ADAPTER_CONFIG} must be a module name list or a regex, not {target!r}")
    experts = c.get("target_parameters") or []
    adapted: set[str] = set()
    for key, t in adapter.tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue  # refused (or dropped, for saved base layers) by recovery itself
        module, part = m["module"], m["part"]
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{where}: {key} holds non-finite values (NaN or inf) or is not floating point; retrain it")
        owner = re.sub(r"(\.base_layer)+$", "", module)
        if experts and any(("." + owner).endswith("." + p.rpartition(".")[0]) for p in experts if "." in p):
            continue  # LoRA on fused expert tensors (r per expert, stacked): recover/experts.py checks them
        adapted.add(module)
        rank = _pattern_value(rank_pattern, module, r)
        got = t.shape[0] if part in ("lora_A", "lora_embedding_A") else t.shape[-1]
        if t.dim() != 2 or got != rank:
            raise AdapterError(
                f"{where}: {key} has rank {got} but {ADAPTER_CONFIG} says r={rank} for {module}; PEFT cannot load it"
            )
        if not _targeted(target, module):
            raise AdapterError(
                f"{where}: {key} adapts {module}, which target_modules {target!r} does not name; PEFT cannot load it"
            )
    if isinstance(target, list) and adapted:
        idle = [t for t in target if not any(_targeted([t], mod) for mod in adapted)]
        if idle and not experts:
            raise AdapterError(
                f"{where}: target_modules names {idle[0]!r} but the adapter holds no tensors for it; PEFT cannot load it"
            )


def resolve_bundle(adapter: Adapter, bundle: str | Path | Bundle | None) -> Bundle:
    """The bundle an adapter belongs to, refusing one it was not trained on.

    Evidence, when present, must agree with the given bundle: the bundle_id recorded by
    ``loramkit train`` (loram_adapter.json), the bundle tag PEFT copied into the adapter's
    card, and the bundle named by ``base_model_name_or_path``. Without ``bundle``, the
    recorded bundle path, then ``base_model_name_or_path``, is where the bundle is looked for.
    """
    named = adapter.config.get("base_model_name_or_path")
    named_dir = Path(named) if named else None
    recorded_id = (adapter.record or {}).get("bundle_id")
    if bundle is None:
        candidates = [Path(adapter.record["bundle"])] if adapter.record and adapter.record.get("bundle") else []
        candidates += [named_dir] if named_dir is not None else []
        found = next((c for c in candidates if (c / MANIFEST_NAME).is_file()), None)
        if found is None:
            where = ", ".join(str(c) for c in candidates) or "nowhere"
            raise AdapterError(
                f"{adapter.path}: the bundle it was trained on is not reachable (looked at {where}); pass --bundle"
            )
        bundle = found
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    if recorded_id is not None and recorded_id != b.bundle_id:
        raise AdapterError(
            f"{adapter.path}: adapter was trained on bundle {recorded_id[:23]}…, not on {b.path} "
            f"({b.bundle_id[:23]}…); pass the bundle it was trained on"
        )
    tags = set(adapter.tags)
    if tags and bundle_tag(b.bundle_id) not in tags:
        raise AdapterError(
            f"{adapter.path}: adapter was trained on bundle {sorted(tags)[0]}, not on {b.path} "
            f"({bundle_tag(b.bundle_id)}); pass the bundle it was trained on"
        )
    if named_dir is not None and (named_dir / MANIFEST_NAME).is_file():
        try:
            other = Bundle(named_dir).bundle_id
        except BundleError:
            other = None
        if other is not None and other != b.bundle_id:
            raise AdapterError(
                f"{adapter.path}: adapter was trained on the bundle at {named} ({other[:19]}…), "
                f"not on {b.path} ({b.bundle_id[:19]}…); pass the bundle it was trained on"
            )
    if named and named == b.base["name_or_path"]:
        raise AdapterError(f"{adapter.path}: adapter was trained on the full base model {named}; it needs no recovery")
    return b


def scatter(t: torch.Tensor, full_shape: tuple[int, ...], index: dict[int, torch.Tensor]) -> torch.Tensor:
    """Place ``t`` at the kept indices of each mapped dimension of a zero tensor of ``full_shape``."""
    if not index:
        return t.clone()
    out = torch.zeros(full_shape, dtype=t.dtype)
    # Build the index grid one dimension at a time: rows, then columns.
    rows = index.get(0, torch.arange(full_shape[0]))
    cols = index.get(1, torch.arange(full_shape[1])) if t.dim() > 1 else None
    if cols is None:
        out[rows] = t
    else:
        out[rows[:, None], cols[None, :]] = t
    return out


def recover_tensors(adapter: Adapter, b: Bundle) -> dict[str, torch.Tensor]:
    """The full-size adapter tensors, after checking every key against the bundle."""
    base_tensors = b.base["tensors"]
    maps = b.index_maps
    out: dict[str, torch.Tensor] = {}
    family = b.arch.family
    targeted_params(adapter.config, b.arch, adapter.path)  # refuses target_parameters other than experts
    # PEFT also saves the (never pruned) embedding / lm_head weights when they are LoRA
    # targets; inference must use the original model's own, so those copies are dropped.
    saved_base_layers = {f"{_PREFIX}{m}.base_layer.weight" for m in (family.embeddings, family.lm_head)}
    for key, t in adapter.tensors.items():
        if key in saved_base_layers:
            continue
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{adapter.path}: tensor {key} is not a LoRA A/B matrix "
                f"(modules_to_save and other extras are unsupported); train with LoRA only"
            )
        module, part = m["module"], m["part"]
        expert = expert_param(module, adapter.config, b.arch, adapter.path)
        if expert is not None:  # LoRA on a layer's fused expert tensors: each expert to its own channels
            out[key] = recover_expert(t, part, *expert, b.arch, maps, key, adapter.path)
            continue
        weight = f"{module}.weight"
        if weight not in base_tensors and b.arch.tie_word_embeddings and module == family.lm_head:
            weight = f"{family.embeddings}.weight"  # a tied lm_head is stored as the embeddings
        if weight not in base_tensors:
            raise AdapterError(f"{adapter.path}: target module {module} is unknown to the bundle's base model")
        shape = base_tensors[weight]["shape"]
        if len(shape) != 2:
            raise AdapterError(
                f"{adapter.path}: target module {module} is not a Linear or Embedding ({weight} has shape {shape})"
            )
        out_full, in_full = shape
        index: dict[int, torch.Tensor] = {}
        if part == "lora_A":  # (r, in): columns follow the module's kept inputs
            full = (t.shape[0], in_full)
            if f"{weight}:1" in maps:
                index[1] = maps[f"{weight}:1"]
        elif part == "lora_B":  # (out, r): rows follow the module's kept outputs
            full = (out_full, t.shape[1])
            if f"{weight}:0" in maps:
                index[0] = maps[f"{weight}:0"]
        elif part == "lora_embedding_A":  # (r, num_embeddings); embeddings are never pruned
            full = (t.shape[0], out_full)
        else:  # lora_embedding_B: (embedding_dim, r)
            full = (in_full, t.shape[1])
        want = tuple(len(index[d]) if d in index else s for d, s in enumerate(full))
        if tuple(t.shape) != want:
            raise AdapterError(
                f"{adapter.path}: {key} has shape {list(t.shape)} but the bundle's kept dims give {list(want)}; "
                "the adapter was trained on another bundle"
            )
        out[key] = scatter(t, full, index)
    halves: dict[str, set[str]] = {}
    for key in out:  # PEFT only warns on a missing half and leaves B = 0: refuse it here
        m = _KEY.match(key)
        halves.setdefault(m["module"], set()).add(m["part"][-1])
    for module, got in halves.items():
        if got != {"A", "B"}:
            missing = "B" if "A" in got else "A"
            raise AdapterError(f"{adapter.path}: {module} lacks its LoRA {missing} matrix; the adapter is incomplete")
    if not out:
        raise AdapterError(f"{adapter.path}: the adapter holds no LoRA weights")
    return out


def recover_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    bundle: str | Path | Bundle | None = None,
    *,
    overwrite: bool = False,
    then: Callable[[Path, Bundle], None] | None = None,
) -> dict[str, Any]:
    """Write the full-model PEFT adapter for ``adapter_dir`` to ``out_dir``; returns a summary.

    ``then(staged_adapter, bundle)`` runs on the written adapter before it becomes ``out_dir``
    (``recover --merge`` writes the merged model there), so a failed or killed step leaves
    neither output, and the same command can simply be run again.

    Raises:
        AdapterError: foreign adapter, shapes not matching the bundle, unknown target
            module, or not plain LoRA. Nothing is written then.
    """
    from safetensors.torch import save_file

    adapter = Adapter.read(adapter_dir)
    check_plain_lora(adapter.config, adapter.path)
    check_peft_rules(adapter)
    b = resolve_bundle(adapter, bundle)
    inputs = [adapter.path, b.path]
    check_out_clear(out_dir, inputs)
    tensors = recover_tensors(adapter, b)
    config = dict(adapter.config)
    config["base_model_name_or_path"] = b.base["name_or_path"]
    config["revision"] = b.base.get("revision")
    with staged_dir(out_dir, overwrite, inputs=inputs) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, config)
        (tmp / "README.md").write_text(_card(config, b), encoding="utf-8")
        check_peft_rules(Adapter.read(tmp))  # what we wrote passes the rules we hold adapters to, before any merge
        if then is not None:
            then(tmp, b)
    return {
        "bundle": str(b.path),
        "bundle_id": b.bundle_id,
        "base": b.base["name_or_path"],
        "recovery": "rebind" if b.sparsity else "scatter",
        "tensors": len(tensors),
        "modules": len({k.rsplit(".", 2)[0] for k in tensors}),
    }


def _card(config: dict[str, Any], b: Bundle) -> str:
    metadata = {"base_model": b.base["name_or_path"], "library_name": "peft", "tags": ["lora", "loram", "loram-recovered"]}
    sparsity = b.sparsity
    if sparsity:
        kind = f"{sparsity['pattern']} semi-structured" if sparsity.get("pattern") else "unstructured"
        how = (
            f"Trained with LoRAM on the {kind} sparse bundle `{b.bundle_id}`, which keeps the base's\n"
            "shapes: loramkit rebound it to the original model unchanged (its delta applies to every\n"
            "weight, pruned or not, as in the paper). Load it with\n"
        )
    else:
        how = (
            f"Trained with LoRAM on the pruned bundle `{b.bundle_id}` and recovered to the full model's\n"
            "dimensions by loramkit (zeros on pruned channels). Load it with\n"
        )
    return compose_card(
        metadata,
        f"# LoRA adapter for `{b.base['name_or_path']}`\n\n{how}`peft.PeftModel.from_pretrained(base_model, this_dir)`.\n",
    )
