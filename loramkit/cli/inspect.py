"""loramkit inspect BUNDLE [--json]"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ._common import AsJson, Endpoint, Token, console, print_json


def summary(path: Path) -> dict[str, Any]:
    """What is inside a bundle, from its manifest and the bytes on disk."""
    from ..bundle import Bundle

    b = Bundle(path)
    m = b.manifest
    weights = m["weights"]["files"]
    on_disk = {rel: e["size"] for rel, e in m["files"].items()}
    return (
        {
            "path": str(b.path),
            "bundle_id": m["bundle_id"],
            "format_version": m["format_version"],
            "created_by": m["created_by"],
            "base": {k: m["base"][k] for k in ("name_or_path", "revision", "dtype")},
            "architecture": {k: v for k, v in m["architecture"].items() if k != "layers"},
            "pruning": m["pruning"],
            "quantization": m["quantization"],
            "sparsity": b.sparsity,
            "weights_dtype": m["weights"]["dtype"],
            "alignment": m["alignment"],
            "parameters": m["parameters"],
            "bytes": {"weights": sum(on_disk.get(f, 0) for f in weights), "total": sum(on_disk.values())},
            "layers": m["architecture"]["layers"],
        }
        | ({"quantized_bytes": _quantized_bytes(b)} if m["quantization"] else {})
        | ({"sparse_modules": _sparse_modules(b)} if b.sparsity else {})
    )


def _sparse_modules(b: Any) -> list[dict[str, Any]]:
    """Per sparse module (spec 7.3): kept weights and real bytes (mask + values) against the dense
    weight's bytes in its base dtype. Read from the safetensors headers only."""
    from ..bundle import sparse
    from ..bundle.safetensors_io import nbytes_of

    base = b.base["tensors"]
    rows = []
    with b.weights() as ckpt:
        for mod in sorted(
            b.sparse_modules, key=lambda x: (b.arch.family.layer_of(x), _ROLE_ORDER.get(x.rsplit(".", 1)[1], 99), x)
        ):
            w = base[f"{mod}.weight"]
            mask, values = ckpt.info(sparse.mask_key(mod)), ckpt.info(sparse.values_key(mod))
            total = math.prod(w["shape"])
            kept = values.numel
            rows.append({
                "module": mod, "layer": b.arch.family.layer_of(mod), "shape": w["shape"], "kept": kept, "total": total,
                "sparsity": 1 - kept / total, "bytes": mask.nbytes + values.nbytes, "dense_bytes": nbytes_of(w["dtype"], w["shape"]),
            })  # fmt: skip
    return rows


def _quantized_bytes(b: Any) -> dict[str, int]:
    """Tensor data bytes of the 4-bit Linears (codes + block constants) and of everything else."""
    from ..bundle.quantization import state_keys

    q = b.manifest["quantization"]
    four_bit = {k for mod in q["modules"] for k in state_keys(mod, q["quant_type"], q["double_quant"])}
    sizes = {"4bit": 0, "16bit": 0}
    with b.weights() as ckpt:  # headers only
        for name in ckpt.names():
            sizes["4bit" if name in four_bit else "16bit"] += ckpt.info(name).nbytes
    return sizes


def _quantization_lines(s: dict[str, Any]) -> list[str]:
    q = s["quantization"]
    if q is None:
        return ["none (16/32-bit weights)"]
    roles = sorted({m.rsplit(".", 1)[1] for m in q["modules"]}, key=lambda r: _ROLE_ORDER.get(r, len(_ROLE_ORDER)))
    layers = len({m.split(".")[2] for m in q["modules"] if m.startswith("model.layers.")})
    dq = "double quant" if q["double_quant"] else "no double quant"
    qb = s["quantized_bytes"]
    return [
        f"{q['quant_type']} 4-bit ({q['method']}, blocksize {q['blocksize']}, {dq}, compute {q['compute_dtype']})",
        f"4-bit: {', '.join(roles)} in {layers} layers ({len(q['modules'])} Linear modules, {qb['4bit'] / 2**20:,.2f} MiB)",
        f"16-bit: embeddings, norms, biases and lm_head stay {s['weights_dtype']} ({qb['16bit'] / 2**20:,.2f} MiB)",
    ]


_ROLE_ORDER = {r: i for i, r in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def _kept(d: dict[str, int]) -> str:
    return str(d["original"]) if d["kept"] == d["original"] else f"{d['kept']}/{d['original']}"


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        bundle: Annotated[str, typer.Argument(help="Bundle directory or Hub repo id (org/name[@revision]).")],
        endpoint: Endpoint = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        """Show what a bundle holds: base, dims per layer, parameters, bytes on disk."""
        from ..hub.resolve import bundle_dir

        s = summary(bundle_dir(bundle, endpoint=endpoint, token=token))
        if as_json:
            return print_json(s)
        p, a, pr = s["parameters"], s["architecture"], s["pruning"]
        head: list[tuple[str, str]] = []  # plain lines, not a Table: long paths and ids are never cut
        head.append(("bundle", f"{s['path']}  (format {s['format_version']}, {s['created_by']})"))
        head.append(("id", s["bundle_id"]))
        rev = f"@{s['base']['revision']}" if s["base"]["revision"] else ""
        head.append(("base", f"{s['base']['name_or_path']}{rev}  [{a['architecture']}, {s['base']['dtype']}]"))
        pattern = f" {s['sparsity']['pattern']}" if s["sparsity"] and s["sparsity"]["pattern"] else ""
        head.append(("pruning", f"{pr['strategy']}{pattern}, {pr['importance']}, ratio {pr['ratio']}, seed {pr['seed']}, "
                     f"keep first {pr['keep_first']} / last {pr['keep_last']}"))  # fmt: skip
        head.append(("parameters", f"{p['original']:,} -> {p['pruned']:,}  ({p['original'] / p['pruned']:.2f}x fewer)"))
        head.append(
            ("on disk", f"weights {s['bytes']['weights'] / 2**20:,.1f} MiB, total {s['bytes']['total'] / 2**20:,.1f} MiB")
        )
        for i, line in enumerate(_quantization_lines(s)):
            head.append(("quantization" if i == 0 else "", line))
        if s["sparsity"]:
            mods = s["sparse_modules"]
            real, dense = sum(r["bytes"] for r in mods), sum(r["dense_bytes"] for r in mods)
            head.append(("sparsity", f"{len(mods)} projections in {len({r['layer'] for r in mods})} layers stored as bitmask + "
                         f"values: {real / 2**20:,.2f} MiB, {dense / 2**20:,.2f} MiB dense ({real / dense:.2%})"))  # fmt: skip
        head.append(("alignment", "none" if s["alignment"] is None else json.dumps(s["alignment"])))
        for key, value in head:
            console.print(f"{key:<13} {value}")
        if s["sparsity"]:
            console.print(_sparse_table(s["sparse_modules"]))
            return _print_plan(s)
        layers = Table(title="layers (kept/original)")
        for col in ("layer", "pruned", "heads", "kv heads", "intermediate"):
            layers.add_column(col, justify="right")
        for d in s["layers"]:
            layers.add_row(str(d["index"]), "yes" if d["pruned"] else "", _kept(d["num_attention_heads"]),
                           _kept(d["num_key_value_heads"]), _kept(d["intermediate_size"]))  # fmt: skip
        console.print(layers)
        _print_plan(s)


def _sparse_table(mods: list[dict[str, Any]]) -> Table:
    """Per layer (its sparse projections summed) and in total: kept weights and real vs dense bytes."""
    table = Table(title="sparse projections per layer (mask + values vs dense)")
    for col in ("layer", "projections", "kept / weights", "sparsity", "MiB", "dense MiB", "of dense"):
        table.add_column(col, justify="right")
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in mods:
        groups.setdefault(r["layer"], []).append(r)

    def row(label: str, rs: list[dict[str, Any]]) -> list[str]:
        kept, total = sum(r["kept"] for r in rs), sum(r["total"] for r in rs)
        real, dense = sum(r["bytes"] for r in rs), sum(r["dense_bytes"] for r in rs)
        return [label, str(len(rs)), f"{kept:,} / {total:,}", f"{1 - kept / total:.2%}", f"{real / 2**20:,.2f}",
                f"{dense / 2**20:,.2f}", f"{real / dense:.2%}"]  # fmt: skip

    for layer, rs in sorted(groups.items()):
        table.add_row(*row(str(layer), rs))
    table.add_row(*row("total", mods), style="bold")
    return table


def _print_plan(s: dict[str, Any]) -> None:
    """The `loramkit plan` table for this bundle's model and ratio, with the bundle's actual weight bytes."""
    from ..planner import plan
    from .plan import plan_table

    b_config = json.loads((Path(s["path"]) / "config.json").read_text(encoding="utf-8"))
    pr, q, sp = s["pruning"], s["quantization"], s["sparsity"]
    if sp:  # the bundle's own strategy: LoRAM-Unst / LoRAM-Semi rows
        from ..bundle.sparse import SPARSE_IMPORTANCES
        from ..planner import SPARSE_METHODS

        if sp["pattern"] is None and pr["importance"] not in SPARSE_IMPORTANCES:
            return None  # kept counts follow the importance's comparison groups: unknown ones cannot be planned

        p = plan(b_config, None if sp["pattern"] else pr["ratio"], strategy=pr["strategy"], pattern=sp["pattern"],
                 importance=pr["importance"], keep_first=pr["keep_first"], keep_last=pr["keep_last"])  # fmt: skip
        method = SPARSE_METHODS[pr["strategy"]]
        return console.print(
            plan_table(p, "memory plan (loramkit plan) and this bundle's actual weights", (method, s["bytes"]["weights"]))
        )
    p = plan(b_config, pr["ratio"], keep_first=pr["keep_first"], keep_last=pr["keep_last"],
             quant_type=q["quant_type"] if q else "nf4")  # fmt: skip
    method = "QLoRAM" if q else "LoRAM"
    console.print(plan_table(p, "memory plan (loramkit plan) and this bundle's actual weights", (method, s["bytes"]["weights"])))
