"""``loramkit validate`` / :func:`loramkit.bundle.validate.validate` (specs/bundle-v1.md section 9).

A fresh bundle of every family is sound; then each corruption of a COPY of a bundle is
reported as a specific problem (exit 1), or as a warning where the spec says so (exit 0).
Tampering that keeps hashes and ``bundle_id`` consistent (re-finalized with
:func:`loramkit.bundle.writer.finalize`, or re-signed) must still be caught by the
content checks: index-map consistency, shapes, config hash, layer table.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramkit import cli
from loramkit.bundle.manifest import bundle_id
from loramkit.bundle.validate import validate
from loramkit.bundle.writer import finalize
from tests.factory import CASE_NAMES

CASE = "llama_gqa"  # hidden 64, 16 heads of 16, 4 KV heads (G = 4), intermediate 172, 8 layers
HEAD_DIM, GROUP = 16, 4
# keep_first 2 / keep_last 1 (the shallow-model defaults): layers 2..6 are pruned.
PRUNE_KW: dict[str, Any] = dict(importance="magnitude", seed=0, show_progress=False)


# ---------------------------------------------------------------------------- bundles

_BUNDLES: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def make_bundle(make_base_dir, tmp_path_factory) -> Callable[..., Path]:
    """``make_bundle(case, **prune_kw)``: a bundle pruned at ratio 0.5, built once. READ-ONLY: copy it."""
    from loramkit.prune.pruner import prune

    def _make(case: str = CASE, **kw: Any) -> Path:
        key = (case, tuple(sorted(kw.items())))
        if key not in _BUNDLES:
            out = tmp_path_factory.mktemp(f"validate_{case}") / "bundle"
            prune(make_base_dir(case), out, 0.5, **{**PRUNE_KW, **kw})
            _BUNDLES[key] = out
        return _BUNDLES[key]

    return _make


@pytest.fixture
def copy(make_bundle, tmp_path) -> Callable[..., Path]:
    """``copy(**kw)``: a private, writable copy of a cached bundle."""

    def _copy(case: str = CASE, **kw: Any) -> Path:
        dst = tmp_path / "bundle"
        shutil.copytree(make_bundle(case, **kw), dst)
        return dst

    return _copy


def read_manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "loram.json").read_text(encoding="utf-8"))


def write_manifest(d: Path, m: dict[str, Any]) -> None:
    (d / "loram.json").write_text(json.dumps(m, indent=2), encoding="utf-8")


def refinalize(d: Path) -> None:
    """Re-hash every file and recompute bundle_id, as a careful forger would."""
    finalize(d, read_manifest(d))


def resign(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest and recompute bundle_id, so only the content checks can object."""
    m = read_manifest(d)
    edit(m)
    m["bundle_id"] = bundle_id(m)
    write_manifest(d, m)


def pruned_layer(d: Path) -> int:
    return read_manifest(d)["pruning"]["pruned_layers"][0]


def run_validate(capsys, d: Path) -> tuple[int, str, str]:
    rc = cli.run(["validate", str(d)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_problem(capsys, d: Path, *needles: str) -> list[str]:
    """validate() reports a problem containing every needle; the CLI exits 1 with that problem."""
    problems, warnings = validate(d)
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}; problems={problems} warnings={warnings}"
    rc, out, err = run_validate(capsys, d)
    assert rc == 1, (out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and "not a sound bundle" in lines[-1], err
    assert any(line.startswith("problem: ") and all(n in line for n in needles) for line in lines), err
    assert "sound" not in out
    return problems


def assert_only_warning(capsys, d: Path, *needles: str) -> None:
    problems, warnings = validate(d)
    assert problems == [], problems
    assert any(all(n in w for n in needles) for w in warnings), warnings
    rc, out, err = run_validate(capsys, d)
    assert rc == 0, err
    assert "sound" in out
    assert any(line.startswith("warning: ") and all(n in line for n in needles) for line in err.splitlines()), err


def no_integrity_problems(problems: list[str]) -> None:
    """After re-finalizing, hashes and bundle_id are consistent: any problem is a content problem."""
    assert not [p for p in problems if "its sha256" in p or "bundle_id" in p or "missing from" in p], problems


# ---------------------------------------------------------------------------- sound bundles


@pytest.mark.parametrize("case", CASE_NAMES)
def test_fresh_bundle_is_sound(make_bundle, case):
    assert validate(make_bundle(case)) == ([], [])


def test_fresh_sharded_and_random_bundles_are_sound(capsys, make_bundle):
    sharded = make_bundle(CASE, max_shard_size="400KB")
    assert len(read_manifest(sharded)["weights"]["files"]) > 1
    assert validate(sharded) == ([], [])
    assert validate(make_bundle(CASE, importance="random", seed=3)) == ([], [])
    rc, out, err = run_validate(capsys, sharded)
    assert rc == 0 and "sound" in out and err == ""


def test_dot_files_are_ignored(copy):
    d = copy()
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (d / ".cache").mkdir()
    (d / ".cache" / "leftover.bin").write_bytes(b"\x80\x04not a pickle")
    assert validate(d) == ([], [])


# ---------------------------------------------------------------------------- files: hashes, presence, extras


def test_flipped_byte_in_shard_data(capsys, copy):
    d = copy(max_shard_size="400KB")
    shard = d / read_manifest(d)["weights"]["files"][1]
    data = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    pos = 8 + header_len + (len(data) - 8 - header_len) // 2  # inside the tensor data
    data[pos] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = assert_problem(capsys, d, shard.name, "sha256")
    assert len(problems) == 1, problems


def test_truncated_shard(capsys, copy):
    d = copy(max_shard_size="400KB")
    shard = d / read_manifest(d)["weights"]["files"][0]
    shard.write_bytes(shard.read_bytes()[:-4096])
    assert_problem(capsys, d, shard.name)


def test_truncated_single_weight_file(capsys, copy):
    d = copy()
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    assert_problem(capsys, d, "model.safetensors")


@pytest.mark.parametrize(
    "victim",
    ["tokenizer.json", "config.json", "kept_indices.safetensors", "model.safetensors.index.json", "SHARD"],
)
def test_deleted_listed_file(capsys, copy, victim):
    d = copy(max_shard_size="400KB")
    if victim == "SHARD":
        victim = read_manifest(d)["weights"]["files"][-1]
    (d / victim).unlink()
    assert_problem(capsys, d, victim, "missing")


# specs/bundle-v1.md 9.4: an unlisted file with one of these suffixes is an error.
WEIGHT_SUFFIXES = [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5", ".msgpack", ".onnx"]


@pytest.mark.parametrize("name", ["extra.safetensors", "pytorch_model.bin", "sub/extra.pt"] + [f"w{s}" for s in WEIGHT_SUFFIXES])
def test_unlisted_weight_file_is_a_problem(capsys, copy, name):
    d = copy()
    (d / name).parent.mkdir(exist_ok=True)
    (d / name).write_bytes(b"\x00" * 16)
    assert_problem(capsys, d, name, "not listed")


@pytest.mark.parametrize("name", ["notes.txt", "docs/USAGE.md"])
def test_unlisted_other_file_is_a_warning(capsys, copy, name):
    d = copy()
    (d / name).parent.mkdir(exist_ok=True)
    (d / name).write_text("hello")
    assert_only_warning(capsys, d, name)


def test_hand_edited_manifest_breaks_bundle_id(capsys, copy):
    d = copy()
    m = read_manifest(d)
    m["parameters"]["pruned"] -= 1
    write_manifest(d, m)
    assert_problem(capsys, d, "bundle_id")


def test_hand_edited_unknown_field_breaks_bundle_id(capsys, copy):
    """Unknown fields are part of the identity (3.8)."""
    d = copy()
    m = read_manifest(d)
    m["pruning"]["note"] = "added later"
    write_manifest(d, m)
    assert_problem(capsys, d, "bundle_id")


@pytest.mark.parametrize("how", ["edit", "delete"])
def test_model_card_is_outside_the_identity(capsys, copy, how):
    d = copy()
    if how == "edit":
        (d / "README.md").write_text("---\nlibrary_name: loramkit\n---\n# my own card\n")
    else:
        (d / "README.md").unlink()
    assert_only_warning(capsys, d, "README.md")


def test_refreshed_model_card_is_sound(copy):
    """Refreshing README.md and only its files entry keeps bundle_id (3.8)."""
    d = copy()
    before = read_manifest(d)["bundle_id"]
    (d / "README.md").write_text("# refreshed card\n")
    refinalize(d)
    assert read_manifest(d)["bundle_id"] == before
    assert validate(d) == ([], [])


# ---------------------------------------------------------------------------- index maps (re-finalized)


def tamper_maps(d: Path, edit: Callable[[dict[str, torch.Tensor], int], None]) -> None:
    p = d / "kept_indices.safetensors"
    maps = load_file(str(p))
    edit(maps, pruned_layer(d))
    save_file({k: v.contiguous() for k, v in maps.items()}, str(p))
    refinalize(d)


def _attn(layer: int, proj: str, dim: int = 0) -> str:
    return f"model.layers.{layer}.self_attn.{proj}_proj.weight:{dim}"


def _mlp(layer: int, proj: str, dim: int = 0) -> str:
    return f"model.layers.{layer}.mlp.{proj}_proj.weight:{dim}"


def _rows(groups: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(g * width, (g + 1) * width) for g in groups])


def test_q_rows_of_other_groups(capsys, copy):
    """q/o maps are whole heads, ascending, right length, but of KV groups that were not kept."""
    d = copy()
    layer = pruned_layer(d)

    def edit(maps, layer):
        kept = sorted({int(i) // HEAD_DIM for i in maps[_attn(layer, "k")]})
        other = [g for g in range(4) if g not in kept][: len(kept)]
        assert len(other) == len(kept) == 2
        q = _rows(other, GROUP * HEAD_DIM)
        assert len(q) == len(maps[_attn(layer, "q")]) and not torch.equal(q, maps[_attn(layer, "q")])
        maps[_attn(layer, "q")] = q
        maps[_attn(layer, "o", 1)] = q.clone()

    tamper_maps(d, edit)
    problems = assert_problem(capsys, d, f"layers.{layer}.self_attn", "q_proj")
    no_integrity_problems(problems)


def test_k_rows_not_whole_heads(capsys, copy):
    d = copy()
    layer = pruned_layer(d)

    def edit(maps, layer):
        for proj in ("k", "v"):
            maps[_attn(layer, proj)] = maps[_attn(layer, proj)] + 1  # shifted by one row: splits heads

    tamper_maps(d, edit)
    # the last head's rows now point one past k_proj: the readers' own check (reader.index_map_problems)
    problems = assert_problem(capsys, d, f"layers.{layer}.self_attn.k_proj", "points outside")
    no_integrity_problems(problems)


@pytest.mark.parametrize("which", ["attention", "mlp"])
def test_maps_not_ascending(capsys, copy, which):
    d = copy()
    layer = pruned_layer(d)

    def edit(maps, layer):
        if which == "attention":  # consistent across the coupled group, but descending
            for key in (_attn(layer, "k"), _attn(layer, "v"), _attn(layer, "q"), _attn(layer, "o", 1)):
                maps[key] = maps[key].flip(0)
        else:
            for key in (_mlp(layer, "gate"), _mlp(layer, "up"), _mlp(layer, "down", 1)):
                m = maps[key].clone()
                m[[0, 1]] = m[[1, 0]]
                maps[key] = m

    tamper_maps(d, edit)
    problems = assert_problem(capsys, d, f"layers.{layer}.", "not strictly ascending")  # the readers' own check
    no_integrity_problems(problems)


def test_coupled_mlp_maps_disagree(capsys, copy):
    d = copy()
    layer = pruned_layer(d)

    def edit(maps, layer):
        up = maps[_mlp(layer, "up")]
        j = int(torch.nonzero(up[1:] - up[:-1] >= 2)[0])
        m = up.clone()
        m[j] += 1  # an unkept channel, still strictly ascending: only the coupling is broken
        assert not torch.equal(m, up)
        maps[_mlp(layer, "up")] = m

    tamper_maps(d, edit)
    problems = assert_problem(capsys, d, _mlp(layer, "up"))
    no_integrity_problems(problems)


def test_map_out_of_range(capsys, copy):
    d = copy()
    layer = pruned_layer(d)

    def edit(maps, layer):
        for key in (_mlp(layer, "gate"), _mlp(layer, "up"), _mlp(layer, "down", 1)):
            m = maps[key].clone()
            m[-1] = 172 + 5  # past the original intermediate size, still ascending
            maps[key] = m

    tamper_maps(d, edit)
    problems = assert_problem(capsys, d, _mlp(layer, "down", 1), "outside")
    no_integrity_problems(problems)


@pytest.mark.parametrize("change", ["missing", "extra-identity", "int32"])
def test_map_set_and_dtype(capsys, copy, change):
    d = copy()
    layer = pruned_layer(d)
    key = {"missing": _attn(layer, "o", 1), "extra-identity": _mlp(0, "down", 1), "int32": _attn(layer, "v")}[change]

    def edit(maps, layer):
        if change == "missing":
            del maps[key]
        elif change == "extra-identity":  # layer 0 is not pruned: identity maps MUST NOT be written
            maps[key] = torch.arange(172)
        else:
            maps[key] = maps[key].to(torch.int32)

    tamper_maps(d, edit)
    problems = assert_problem(capsys, d, key)
    no_integrity_problems(problems)


# ---------------------------------------------------------------------------- weights (re-finalized)


def tamper_weights(d: Path, edit: Callable[[dict[str, torch.Tensor], int], None]) -> None:
    p = d / "model.safetensors"
    w = load_file(str(p))
    edit(w, pruned_layer(d))
    save_file({k: v.contiguous() for k, v in w.items()}, str(p), metadata={"format": "pt"})
    refinalize(d)


@pytest.mark.parametrize(
    "change, needles",
    [
        ("short-rows", ["mlp.up_proj.weight", "expected"]),
        ("unpruned-shape", ["self_attn.q_proj.weight", "expected"]),
        ("dtype", ["mlp.down_proj.weight", "F16"]),
        ("missing", ["lack", "post_attention_layernorm"]),
        ("extra", ["model.layers.0.extra.weight"]),
    ],
)
def test_weight_tensor_tampering(capsys, copy, change, needles):
    d = copy()

    def edit(w, layer):
        pre = f"model.layers.{layer}."
        if change == "short-rows":
            w[pre + "mlp.up_proj.weight"] = w[pre + "mlp.up_proj.weight"][:-1]
        elif change == "unpruned-shape":  # base-sized tensor where the maps say pruned
            w[pre + "self_attn.q_proj.weight"] = torch.zeros(256, 64)
        elif change == "dtype":
            w[pre + "mlp.down_proj.weight"] = w[pre + "mlp.down_proj.weight"].half()
        elif change == "missing":
            del w[pre + "post_attention_layernorm.weight"]
        else:
            w["model.layers.0.extra.weight"] = torch.zeros(3)

    tamper_weights(d, edit)
    problems = assert_problem(capsys, d, *needles)
    no_integrity_problems(problems)


def test_unpruned_tensor_changed(capsys, copy):
    """9.11: with alignment null, an unpruned tensor is bit-identical to its base fingerprint."""
    d = copy()

    def edit(w, layer):
        w["model.norm.weight"] = w["model.norm.weight"] + 1.0

    tamper_weights(d, edit)
    problems = assert_problem(capsys, d, "model.norm.weight")
    no_integrity_problems(problems)


# ---------------------------------------------------------------------------- config and manifest (re-signed)


def test_config_changed(capsys, copy):
    d = copy()
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    refinalize(d)
    problems = assert_problem(capsys, d, "config_sha256")
    no_integrity_problems(problems)


def test_config_resaved_by_other_transformers_is_sound(copy):
    """config_sha256 ignores _name_or_path / transformers_version / _commit_hash (3.2)."""
    d = copy()
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(transformers_version="99.0.0", _name_or_path="elsewhere", _commit_hash="0" * 40)
    (d / "config.json").write_text(json.dumps(cfg, indent=4, sort_keys=True))
    refinalize(d)
    assert validate(d) == ([], [])


def _flag_layer_pruned(m):  # marks a non-eligible layer (0) as pruned, consistently
    m["pruning"]["pruned_layers"] = sorted([0, *m["pruning"]["pruned_layers"]])
    m["architecture"]["layers"][0]["pruned"] = True


MANIFEST_EDITS: dict[str, tuple[Callable[[dict], None], list[str]]] = {
    # spec 9.7: pruned flags and pruned_layers agree
    "pruned_layers-disagree": (
        lambda m: m["pruning"].update(pruned_layers=m["pruning"]["pruned_layers"][:-1]),
        ["pruned_layers"],
    ),
    # spec 9.7 / 4.2: non-eligible layers intact (layer 2 is pruned but keep_first says 3)
    "keep_first-contradicts": (lambda m: m["pruning"].update(keep_first=3), []),
    # spec 9.7 / 4.3: with rounding "paper", kept counts follow from ratio
    "ratio-contradicts": (lambda m: m["pruning"].update(ratio=0.25), []),
    # spec 9.8: weights.dtype == base.dtype
    "weights-dtype": (lambda m: m["weights"].update(dtype="bfloat16"), ["dtype"]),
    # spec 9.10: parameters.original == base.num_parameters == sum of base.tensors
    "num_parameters": (lambda m: m["base"].update(num_parameters=m["base"]["num_parameters"] + 1), ["num_parameters"]),
    "parameters-original": (lambda m: m["parameters"].update(original=m["parameters"]["original"] + 1), ["parameters.original"]),
    # spec 9.6: architecture agrees with config.json
    "model_type": (lambda m: m["architecture"].update(model_type="mistral"), ["model_type"]),
    "hidden_size": (lambda m: m["architecture"].update(hidden_size=128), ["hidden_size"]),
    "family": (lambda m: m["architecture"].update(family="qwen2"), ["family"]),
    # spec 3.3: original equals the config value
    "intermediate-original": (
        lambda m: [d["intermediate_size"].update(original=200, kept=200) for d in m["architecture"]["layers"][:1]],
        [],
    ),
    # spec 9.7: GQA kept heads are kept_kv * G
    "heads-not-multiple-of-G": (
        lambda m: m["architecture"]["layers"][m["pruning"]["pruned_layers"][0]]["num_attention_heads"].update(kept=7),
        ["layer"],
    ),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_resigned_manifest_inconsistency(capsys, copy, edit):
    fn, needles = MANIFEST_EDITS[edit]
    d = copy()
    resign(d, fn)
    problems = assert_problem(capsys, d, *needles)
    no_integrity_problems(problems)


@pytest.mark.parametrize(
    "field, value", [("importance", "fisher"), ("rounding", "banker")], ids=["unknown-importance", "unknown-rounding"]
)
def test_unknown_provenance_values_are_warnings(capsys, copy, field, value):
    """9.7: unknown importance / rounding are warnings (readers MUST NOT reject them)."""
    d = copy()
    resign(d, lambda m: m["pruning"].update({field: value}))
    assert_only_warning(capsys, d, value)
