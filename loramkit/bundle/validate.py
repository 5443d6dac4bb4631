"""``loramkit validate``: every check specs/bundle-v1.md lists, collected rather than stopping at the first."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import torch

from .. import progress
from ..errors import LoramError
from ..families import ArchSpec
from ..families.geometry import LayerDims, count_parameters, coupled_slices, layer_index_maps, pruned_shape, unit_rows
from ..families.pruning_rules import (
    IMPORTANCE_KINDS,
    ROUNDING_RULES,
    SPARSE_BLOCK,
    exact_ratio,
    layers_kept_intact,
    plan_layers,
    sparse_kept_count,
)
from . import quantization as qformat
from . import sparse as sformat
from .hashing import config_sha256
from .manifest import CARD_NAME, MANIFEST_NAME, bundle_id
from .model_dir import INDEX_NAME, Checkpoint
from .reader import Bundle, index_map_problems
from .safetensors_io import DTYPES, tensor_sha256

_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
)  # spec 9.4


def _check_pruning_record(m: dict, arch: ArchSpec, layers: list[LayerDims], problems: list[str], warnings: list[str]) -> None:
    """Per-layer dims must be what the recorded ratio, rounding rule and intact layers give."""
    pr = m["pruning"]
    if pr["strategy"] in sformat.STRATEGIES:
        return _check_sparse_record(m, arch, layers, problems, warnings)
    if m.get("sparsity") is not None:
        problems.append(f"sparsity is set, but pruning.strategy {pr['strategy']!r} stores no sparse weights")
    if pr["importance"] not in IMPORTANCE_KINDS:
        warnings.append(f"pruning.importance {pr['importance']!r} is unknown to this loramkit")
    if pr["pruned_layers"] != [d.index for d in layers if d.pruned]:
        problems.append("pruning.pruned_layers does not list exactly the layers marked pruned")
    if pr["rounding"] not in ROUNDING_RULES:
        warnings.append(f"pruning.rounding {pr['rounding']!r} is unknown; kept counts not checked")
        return
    try:
        want, _ = plan_layers(arch, pr["ratio"], pr["keep_first"], pr["keep_last"])
    except LoramError as exc:
        problems.append(f"pruning record: {exc}")
        return
    for got, expected in zip(layers, want):
        if got != expected:
            problems.append(
                f"layer {got.index}: dims {got.to_json()} do not follow the pruning record "
                f"(ratio {pr['ratio']}, keep {pr['keep_first']}/{pr['keep_last']}): expected {expected.to_json()}"
            )


def _check_sparse_record(m: dict, arch: ArchSpec, layers: list[LayerDims], problems: list[str], warnings: list[str]) -> None:
    """Spec 7.3: an unstructured / semi-structured bundle changes no shape, sparsifies exactly the
    projections of the layers between keep_first and keep_last, and its pattern matches its ratio."""
    pr, sp = m["pruning"], m["sparsity"]
    if pr["importance"] not in sformat.SPARSE_IMPORTANCES:
        warnings.append(f"pruning.importance {pr['importance']!r} is unknown to this loramkit for {pr['strategy']} pruning")
    if pr["rounding"] != "floor":
        warnings.append(
            f"pruning.rounding {pr['rounding']!r} is unknown for {pr['strategy']} pruning; counts checked within rounding only"
        )
    if arch.num_experts:
        problems.append(f"{pr['strategy']} pruning of a mixture of experts ({arch.family.name}) is not defined in this format")
    for d in layers:
        if d.pruned:
            problems.append(f"layer {d.index}: marked pruned, but {pr['strategy']} pruning keeps every head and channel")
    try:
        first, last = layers_kept_intact(arch.num_hidden_layers, pr["keep_first"], pr["keep_last"])
    except LoramError as exc:
        problems.append(f"pruning record: {exc}")
        return
    eligible = list(range(first, arch.num_hidden_layers - last))
    if pr["pruned_layers"] != eligible:
        problems.append(f"pruning.pruned_layers is {pr['pruned_layers']}, keep_first {first} / keep_last {last} give {eligible}")
    want = [mod for i in eligible for mod in arch.family.projections(i)]
    got = sp["modules"]
    if set(got) != set(want):
        extra, lacking = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        problems.append(
            "sparsity.modules must be the decoder-layer projections of the pruned layers"
            + (f"; lists {extra[0]}" if extra else "")
            + (f"; lacks {lacking[0]}" if lacking else "")
            + f" ({len(extra)} extra, {len(lacking)} missing)"
        )
    semi = pr["strategy"] == "semi-structured"
    if semi != (sp["pattern"] is not None):
        problems.append(
            f"sparsity.pattern is {sp['pattern']!r}: {pr['strategy']} pruning " + ("needs an N:M pattern" if semi else "has none")
        )
    if sp["pattern"] is not None:
        try:
            n, m_ = sformat.parse_pattern(sp["pattern"])
        except LoramError as exc:
            problems.append(f"sparsity.pattern: {exc}")
            return
        if pr["ratio"] != float(1 - Fraction(n, m_)):  # the float nearest: 1:3's 2/3 has no exact one
            problems.append(f"pruning.ratio {pr['ratio']} is not 1 - N/M = {1 - Fraction(n, m_)} of the {n}:{m_} pattern")


def _sparse_module_problems(
    ckpt: Checkpoint,
    module: str,
    base_weight: dict,
    pattern: tuple[int, int] | None,
    ratio: Fraction | None,
    importance: str,
    warnings: list[str],
) -> tuple[list[str], int]:
    """(problems, nnz) of one sparse Linear (spec 7.3): the two tensors' dtypes and shapes, the
    layout (mask shape, padding bits, value count, N:M), and its sparsity against the ratio:
    exact for the importances whose comparison groups this loramkit knows, bounded otherwise."""
    shape = tuple(base_weight["shape"])
    if len(shape) != 2:
        return [f"sparsity.modules lists {module}, whose weight {list(shape)} is not a Linear's"], 0
    values_info = ckpt.info(sformat.values_key(module))
    nnz = values_info.shape[0] if len(values_info.shape) == 1 else -1
    out = []
    for key, (dt, shp) in sformat.expected_entries(module, shape, max(nnz, 0), base_weight["dtype"]).items():
        info = ckpt.info(key)
        if (info.dtype, tuple(info.shape)) != (dt, shp):
            want = f"{dt}{list(shp)}" if key == sformat.mask_key(module) or nnz >= 0 else f"{dt}[nnz]"
            out.append(f"{key}: stored {info.dtype}{list(info.shape)}, expected {want}")
    if out:
        return out, max(nnz, 0)
    out = sformat.layout_problems(module, shape, ckpt.get(sformat.mask_key(module)), nnz, pattern)
    size = shape[0] * shape[1]
    if not out and pattern is None and ratio is not None:
        removed = size - nnz
        if importance in sformat.SPARSE_IMPORTANCES:  # the pruner's own rule: the count is exact
            want = size - sparse_kept_count(importance, shape, ratio, None)
            if removed != want:
                warnings.append(
                    f"{module}: {removed:,} of {size:,} weights removed, pruning.ratio {float(ratio)} "
                    f"with {importance} groups and floor rounding removes {want:,}"
                )
        else:  # floor loses under one weight per group; no rule of 7.3 has more than out * ceil(in / 128) groups
            groups = shape[0] * -(-shape[1] // SPARSE_BLOCK)
            if not size * ratio - groups < removed <= size * ratio:
                warnings.append(
                    f"{module}: {removed:,} of {size:,} weights removed ({removed / size:.4f}), pruning.ratio "
                    f"{float(ratio)} with floor rounding removes {float(size * ratio - groups):,.0f}..{float(size * ratio):,.0f}"
                )
    return out, nnz


def _ascending(t: torch.Tensor) -> bool:
    return bool((t[1:] > t[:-1]).all())


_SAFETENSORS_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _is_float(code: str) -> bool:
    return code in DTYPES and DTYPES[code].is_floating_point


def _quantized_problems(
    ckpt: Checkpoint, module: str, shape: tuple[int, ...], q: dict, storage: str, stored: set[str]
) -> list[str]:
    """Spec 7.1 for one 4-bit Linear: tensor dtypes and shapes, quant_state, block constants."""
    out: list[str] = []
    entries = qformat.expected_entries(module, shape, q["quant_type"], q["blocksize"], q["double_quant"])
    blob = qformat.blob_key(module, q["quant_type"])
    if any(key not in stored for key in [*entries, blob]):
        return out  # reported as missing
    for key, (dt, shp) in entries.items():
        info = ckpt.info(key)
        if (info.dtype, info.shape) != (dt, shp):
            out.append(
                f"{key}: stored {info.dtype}{list(info.shape)}, expected {dt}{list(shp)} ({q['quant_type']}, blocksize {q['blocksize']})"
            )
    info = ckpt.info(blob)
    if info.dtype != "U8" or len(info.shape) != 1 or info.nbytes > 1 << 16:
        out.append(f"{blob}: stored {info.dtype}{list(info.shape)}, expected a U8 vector of JSON")
    else:
        try:
            state = qformat.parse_quant_state(bytes(ckpt.get(blob).numpy()))
        except (ValueError, UnicodeDecodeError) as exc:
            out.append(f"{blob}: not a JSON object ({exc})")
        else:
            out += [f"{blob}: {p}" for p in qformat.quant_state_problems(state, shape, q, storage)]
    if out:
        return out
    w = f"{module}.weight"
    quant_map = ckpt.get(f"{w}.quant_map")
    if not torch.equal(quant_map, torch.tensor(qformat.QUANT_MAPS[q["quant_type"]], dtype=torch.float32)):
        out.append(f"{w}.quant_map is not the {q['quant_type']} code table")
    constants = [f"{w}.nested_absmax"] if q["double_quant"] else [f"{w}.absmax"]
    for key in constants:
        t = ckpt.get(key)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            out.append(f"{key}: block constants must be finite and non-negative")
    if q["double_quant"]:
        t = ckpt.get(f"{w}.nested_quant_map")
        if not bool(torch.isfinite(t).all()) or bool((t.abs() > 1).any()):
            out.append(f"{w}.nested_quant_map: the 8-bit code table must lie in [-1, 1]")
    return out


def coupled_map_problems(
    arch: ArchSpec, layers: list[LayerDims], maps: dict[str, torch.Tensor], base: dict
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(problems, expected maps): every layer's maps must be what its kept kv heads and channels
    give across the coupled group (q/k/v/o, gate/up/down), whole heads, counts as the manifest
    says. Shared by ``validate`` and every reader (``Bundle.index_maps``); call after
    :func:`~loramkit.bundle.reader.index_map_problems` found nothing.
    """
    problems: list[str] = []
    names = set(base)
    expected_maps: dict[str, torch.Tensor] = {}
    G = arch.group_size
    for d in layers:
        if d.heads != (arch.num_attention_heads, d.kv_heads[1] * G) or d.kv_heads[0] != arch.num_key_value_heads:
            problems.append(f"layer {d.index}: head counts break the KV grouping (G={G})")
            continue
        if not d.pruned:
            if (d.kv_heads[1], d.intermediate[1]) != (d.kv_heads[0], d.intermediate[0]):
                problems.append(f"layer {d.index}: marked unpruned but keeps fewer units")
            continue
        k_name = f"{arch.family.module(d.index, 'k')}.weight"
        k_rows = maps.get(f"{k_name}:0")
        if k_rows is not None:  # k's own rows; in a fused projection (Phi-3 qkv_proj), its segment's
            _, _, start, length = next(seg for seg in coupled_slices(arch, d.index)[k_name] if seg[1] == "kv")
            k_rows = k_rows[(k_rows >= start) & (k_rows < start + length)] - start
        groups = (k_rows[:: arch.head_dim] // arch.head_dim) if k_rows is not None else torch.arange(d.kv_heads[0])
        experts = range(arch.num_experts) if arch.num_experts else [None]  # a mixture: each expert its own channels
        downs = [maps.get(f"{arch.family.module(d.index, 'down', e)}.weight:1") for e in experts]
        rows = [down if down is not None else torch.arange(d.intermediate[0]) for down in downs]
        if not (_ascending(groups) and all(_ascending(r) for r in rows)):
            problems.append(f"layer {d.index}: index maps are not strictly ascending")
            continue
        kept = next((len(r) for r in rows if len(r) != d.intermediate[1]), d.intermediate[1])
        if len(groups) != d.kv_heads[1] or kept != d.intermediate[1]:
            problems.append(
                f"layer {d.index}: index maps keep {len(groups)} kv heads / {kept} channels, manifest says {d.kv_heads[1]} / {d.intermediate[1]}"
            )
            continue
        channels = torch.stack(rows) if arch.num_experts else rows[0]
        if k_rows is not None and not torch.equal(k_rows, unit_rows(groups, arch.head_dim)):
            problems.append(f"layer {d.index}: k rows do not cover whole heads")
        expected_maps |= layer_index_maps(arch, d.index, groups, channels, names)
    for key in sorted(set(maps) | set(expected_maps)):
        got, want = maps.get(key), expected_maps.get(key)
        if got is None:
            problems.append(f"index map {key} is missing")
        elif want is None:
            problems.append(f"index map {key} is unexpected (no pruned dimension there)")
        elif got.dtype != torch.int64 or got.dim() != 1:
            problems.append(f"index map {key} must be a 1-D int64 tensor")
        elif not torch.equal(got, want):
            problems.append(f"index map {key} is inconsistent with its coupled group (or not strictly ascending)")

    return problems, expected_maps


def validate(path: str | Path) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the bundle at ``path``; sound when ``problems`` is empty.

    Raises:
        BundleError: when the manifest itself cannot be read (missing, newer major, bad JSON).
    """
    b = Bundle(path, check_id=False)  # a wrong id is one problem among others here
    m = b.manifest
    problems: list[str] = []
    warnings: list[str] = []

    # Files: listed ones exist and hash right; nothing unlisted that could be loaded as weights.
    listed = set(m["files"])
    for rel in sorted(listed):
        try:
            b.verify_file(rel)
        except LoramError as exc:
            (warnings if rel == CARD_NAME else problems).append(str(exc))
    for p in sorted(b.path.rglob("*")):
        rel = p.relative_to(b.path).as_posix()
        if not p.is_file() or rel == MANIFEST_NAME or rel in listed or any(s.startswith(".") for s in rel.split("/")):
            continue
        followed = p.name.endswith(_WEIGHT_SUFFIXES) or p.name == INDEX_NAME  # what other tools would load
        (problems if followed else warnings).append(f"{rel}: not listed in the manifest")
    if bundle_id(m) != m["bundle_id"]:
        problems.append("bundle_id does not match the manifest's content (edited by hand?)")
    if problems:  # the rest reads these files; their content cannot be trusted
        return problems, warnings

    if config_sha256(b.config) != m["base"]["config_sha256"]:
        problems.append("config.json does not match base.config_sha256")
    arch = b.arch
    declared = m["architecture"]
    for key in ("model_type", "hidden_size", "num_hidden_layers", "head_dim", "vocab_size", "tie_word_embeddings"):
        if declared[key] != getattr(arch, key):
            problems.append(f"architecture.{key} is {declared[key]}, config.json says {getattr(arch, key)}")
    if declared["family"] != arch.family.name:
        problems.append(f"architecture.family is {declared['family']}, config.json is {arch.family.name}")
    layers = b.layers
    if [d.index for d in layers] != list(range(arch.num_hidden_layers)):
        return problems + ["architecture.layers must list every layer once, in order"], warnings
    _check_pruning_record(m, arch, layers, problems, warnings)
    q = m.get("quantization")
    if q is None and m["weights"]["dtype"] != m["base"]["dtype"]:
        problems.append(f"weights.dtype is {m['weights']['dtype']}, base.dtype is {m['base']['dtype']}")
    if q is not None and m["weights"]["dtype"] not in qformat.STORAGE_DTYPES:
        problems.append(
            f"weights.dtype of a 4-bit bundle must be one of {', '.join(qformat.STORAGE_DTYPES)}, not {m['weights']['dtype']}"
        )
    if m["base"]["num_parameters"] != m["parameters"]["original"]:
        problems.append("base.num_parameters differs from parameters.original")

    base = m["base"]["tensors"]
    names = set(base)
    maps = b.raw_index_maps()
    basic = index_map_problems(maps, base)  # the readers' own checks, first: the rest indexes with the maps
    if basic:
        return problems + [f"{b.manifest['index_maps']}: {p}" for p in basic], warnings
    coupled, expected_maps = coupled_map_problems(arch, layers, maps, base)
    problems += coupled

    unchanged_from_base = m.get("alignment") is None  # alignment retrains every weight
    quantized = {f"{mod}.weight": mod for mod in (q["modules"] if q else [])}
    for w, mod in quantized.items():
        if arch.family.role_of(mod) is None or w not in base:
            problems.append(f"quantization.modules lists {mod}, which is not a decoder-layer projection of the base")
    sp = m.get("sparsity")
    if sp is not None and q is not None:
        return problems + [
            "quantization of a sparse bundle is not defined in format 1.2 (spec 7.1); quantize is refused"
        ], warnings
    # spec 7.3: a sparse module's weight is stored as mask + values, under other names
    sparse = {f"{mod}.weight": mod for mod in (sp["modules"] if sp else []) if f"{mod}.weight" in base}
    for mod in sorted(set(sp["modules"] if sp else []) - set(sparse.values())):
        problems.append(f"sparsity.modules lists {mod}, which has no weight in the base")
    sparse_keys = {k for mod in sparse.values() for k in (sformat.mask_key(mod), sformat.values_key(mod))}
    pattern, ratio = None, None  # N:M (checked per group) or the unstructured ratio (checked per module)
    if sp is not None and sp["pattern"] is not None:
        try:
            pattern = sformat.parse_pattern(sp["pattern"])
        except LoramError:
            pass  # reported with the pruning record
    elif sp is not None and m["pruning"]["rounding"] == "floor":
        ratio = exact_ratio(m["pruning"]["ratio"])
    storage = _SAFETENSORS_CODES.get(m["weights"]["dtype"])
    with b.weights() as ckpt:
        stored = set(ckpt.names())
        state_keys = {
            k for w, mod in quantized.items() if w in base for k in qformat.state_keys(mod, q["quant_type"], q["double_quant"])
        } - set(quantized)
        dense_names = names - set(sparse)
        for n in sorted((dense_names | state_keys | sparse_keys) - stored):
            problems.append(f"weights lack {n}")
        for n in sorted(stored - dense_names - state_keys - sparse_keys):
            problems.append(
                f"weights hold {n}, which the base does not have"
                if n not in sparse
                else f"weights hold {n}, stored sparse (mask + values) by sparsity.modules"
            )
        numel = 0
        removed = 0  # weights the sparse modules do not keep, for the count the architecture implies
        checked = sorted(stored & dense_names)
        checked_sparse = sorted(w for w, mod in sparse.items() if {sformat.mask_key(mod), sformat.values_key(mod)} <= stored)
        total = sum(ckpt.info(n).nbytes for n in checked)
        with progress.task("checking tensors", total, transient=True) as advance:  # re-hashes what the base holds unchanged
            for w in checked_sparse:  # one mask in memory at a time; values only through their header
                found, nnz = _sparse_module_problems(
                    ckpt, sparse[w], base[w], pattern, ratio, m["pruning"]["importance"], warnings
                )
                problems += found
                numel += nnz
                removed += torch.Size(base[w]["shape"]).numel() - nnz
            for n in checked:
                info = ckpt.info(n)
                advance(info.nbytes)
                want_shape = pruned_shape(tuple(base[n]["shape"]), n, expected_maps)
                if n in quantized:  # counted by its logical shape (3.5); its state is checked below
                    numel += torch.Size(want_shape).numel()
                    problems += _quantized_problems(ckpt, quantized[n], want_shape, q, m["weights"]["dtype"], stored)
                    continue
                numel += info.numel
                want_dtype = base[n]["dtype"]
                if q is not None and storage is not None and _is_float(want_dtype):
                    want_dtype = storage  # a 4-bit bundle stores every other floating tensor in 16 bits
                if info.shape != want_shape or info.dtype != want_dtype:
                    problems.append(f"{n}: stored {info.dtype}{list(info.shape)}, expected {want_dtype}{list(want_shape)}")
                elif unchanged_from_base and want_shape == tuple(base[n]["shape"]) and info.dtype == base[n]["dtype"]:
                    if tensor_sha256(ckpt.get(n)) != base[n]["sha256"]:
                        problems.append(f"{n}: not pruned, yet differs from the base tensor it copies")
    if numel != m["parameters"]["pruned"]:
        problems.append(f"parameters.pruned is {m['parameters']['pruned']:,}, the weights hold {numel:,}")
    implied = count_parameters(arch, layers) - removed
    if implied > m["parameters"]["pruned"]:  # a tensor the model needs is absent: the readers refuse to load it
        problems.append(
            f"parameters.pruned is {m['parameters']['pruned']:,}, the architecture implies {implied:,}: a tensor (a norm?) is missing"
        )
    elif implied != m["parameters"]["pruned"]:
        warnings.append("parameters.pruned differs from the count implied by the architecture (extra tensors?)")
    if sum(torch.Size(t["shape"]).numel() for t in base.values()) != m["parameters"]["original"]:
        problems.append("parameters.original does not match base.tensors")
    return problems, warnings
