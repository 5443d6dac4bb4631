"""What loramkit refuses to read, and how (specs/bundle-v1.md sections 2, 3.3, 8.2, 10).

Every refusal is a :class:`~loramkit.errors.LoramError` subclass with a message that says what
is wrong (naming the version, feature, field path or file) — never a JSON, jsonschema,
safetensors (Rust) or torch error — and, on the command line, one ``error:`` line with exit 1.
Refusals that involve an output directory leave nothing behind.
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

from loramkit import Bundle, cli, load_pruned_model
from loramkit.bundle.manifest import bundle_id
from loramkit.bundle.validate import validate
from loramkit.bundle.writer import finalize
from loramkit.errors import BaseModelError, BundleError
from loramkit.prune.pruner import prune

CASE = "llama_gqa"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pristine(make_base_dir, tmp_path_factory) -> Path:
    """A sound bundle (ratio 0.5). READ-ONLY: tests work on copies."""
    out = tmp_path_factory.mktemp("refusals_bundle") / "bundle"
    prune(make_base_dir(CASE), out, 0.5, show_progress=False)
    return out


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(pristine, dst)
    return dst


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    return dst


def read_manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "loram.json").read_text(encoding="utf-8"))


def write_manifest(d: Path, m: dict[str, Any], *, resign: bool = False) -> None:
    if resign:
        m["bundle_id"] = bundle_id(m)
    (d / "loram.json").write_text(json.dumps(m, indent=2), encoding="utf-8")


def edit_manifest(d: Path, fn: Callable[[dict[str, Any]], None], *, resign: bool = False) -> None:
    m = read_manifest(d)
    fn(m)
    write_manifest(d, m, resign=resign)


def cli_error(capsys, *args: object) -> str:
    """Run the CLI, expect a user error: exit 1, one stderr line 'error: ...'; returns that line."""
    rc = cli.run([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert rc == 1, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def validate_refuses(capsys, d: Path, needle: str) -> None:
    """`loramkit validate` exits 1 naming ``needle``: as a collected problem or as the one error line."""
    rc = cli.run(["validate", str(d)])
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith(("problem: ", "warning: ", "error: ")) for line in lines), err
    assert lines[-1].startswith("error: ")
    assert needle in err


def refuses_everywhere(capsys, d: Path, *needles: str) -> None:
    """Bundle(), load_pruned_model() and `loramkit validate` / `inspect` all refuse, naming every needle."""
    with pytest.raises(BundleError) as e1:
        Bundle(d)
    with pytest.raises(BundleError) as e2:
        load_pruned_model(d)
    for exc in (e1.value, e2.value):
        msg = str(exc)
        assert "\n" not in msg, msg
        for n in needles:
            assert n in msg, (n, msg)
    for command in ("validate", "inspect"):
        line = cli_error(capsys, command, d)
        for n in needles:
            assert n in line, (n, line)


def assert_no_output(parent: Path, name: str) -> None:
    assert not (parent / name).exists(), f"{name} was written"
    left = [p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    assert left == [], left


# ---------------------------------------------------------------------------- versions and features


def test_newer_major_is_refused_with_upgrade_hint(capsys, bundle):
    edit_manifest(bundle, lambda m: m.update(format_version="2.0.0"))
    refuses_everywhere(capsys, bundle, "2.0.0", "upgrade loramkit")
    msg = str(pytest.raises(BundleError, Bundle, bundle).value)
    assert "1.0.0" in msg or "1.x" in msg  # names both versions (8.2 step 2)


def test_newer_major_refused_before_schema(capsys, bundle):
    """A 2.x manifest may look nothing like 1.x: the version, not the schema, is what the user sees."""
    m = {"format": "loram-bundle", "format_version": "2.3.1", "requires": [], "whatever": {"new": "layout"}}
    write_manifest(bundle, m)
    refuses_everywhere(capsys, bundle, "2.3.1", "upgrade")


def test_newer_minor_with_unknown_fields_is_read(capsys, pristine, bundle):
    def edit(m):
        m["format_version"] = "1.7.0"
        m["future_thing"] = {"kind": "telemetry", "values": [1, 2, 3]}
        m["pruning"]["future_knob"] = 0.5
        m["architecture"]["layers"][0]["future_flag"] = True

    edit_manifest(bundle, edit, resign=True)  # unknown fields are part of the identity
    b = Bundle(bundle)
    assert b.manifest["format_version"] == "1.7.0"
    assert validate(bundle) == ([], [])
    rc = cli.run(["validate", str(bundle)])
    out, err = capsys.readouterr()
    assert rc == 0 and "sound" in out, err
    got = load_pruned_model(bundle).state_dict()
    want = load_pruned_model(pristine).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "version, requires, unknown",
    [
        ("1.1.0", ["sparse-blocks"], ["sparse-blocks"]),
        ("1.4.2", ["quantization", "sparse-blocks"], ["sparse-blocks"]),  # names only what it lacks
        ("1.0.0", ["sparse-blocks"], ["sparse-blocks"]),
    ],
)
def test_unknown_required_feature_is_refused(capsys, bundle, version, requires, unknown):
    edit_manifest(bundle, lambda m: m.update(format_version=version, requires=requires), resign=True)
    refuses_everywhere(capsys, bundle, *unknown, "upgrade")


@pytest.mark.parametrize("fmt", ["loram-bundle-v2", "safetensors", None, "MISSING"])
def test_wrong_format_is_refused(capsys, bundle, fmt):
    def edit(m):
        if fmt == "MISSING":
            del m["format"]
        else:
            m["format"] = fmt

    edit_manifest(bundle, edit)
    refuses_everywhere(capsys, bundle, "loram.json", "format")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0-beta", "", 1])
def test_malformed_version_is_refused(capsys, bundle, version):
    edit_manifest(bundle, lambda m: m.update(format_version=version))
    refuses_everywhere(capsys, bundle, "format_version")


# ---------------------------------------------------------------------------- loram.json itself

BROKEN_MANIFESTS: dict[str, bytes | None] = {
    "not-json": b"{this is not json",
    "empty": b"",
    "array": b"[1, 2, 3]",
    "string": b'"loram-bundle"',
    "utf8-bom": None,  # built from the real manifest
    "duplicate-key": None,
    "nan": None,
    "infinity": None,
    "not-utf8": b'{"format": "loram-bundle\xff"}',
}


@pytest.mark.parametrize("case", list(BROKEN_MANIFESTS))
def test_broken_manifest_is_refused(capsys, bundle, case):
    p = bundle / "loram.json"
    text = p.read_text(encoding="utf-8")
    data = BROKEN_MANIFESTS[case]
    if case == "utf8-bom":
        data = b"\xef\xbb\xbf" + text.encode()
    elif case == "duplicate-key":  # a second "format" key; json.loads would silently keep the last one
        data = text.replace("{", '{\n  "format": "something-else",', 1).encode()
    elif case in ("nan", "infinity"):
        m = json.loads(text)
        m["pruning"]["ratio"] = float("nan") if case == "nan" else float("inf")
        m["bundle_id"] = bundle_id(m)
        data = json.dumps(m).encode()  # Python writes the non-standard NaN / Infinity
    p.write_bytes(data)
    refuses_everywhere(capsys, bundle, "loram.json")


def test_missing_manifest_is_refused(capsys, bundle):
    (bundle / "loram.json").unlink()
    refuses_everywhere(capsys, bundle, "loram.json", "loramkit prune")


def test_missing_bundle_dir_is_refused(capsys, tmp_path):
    refuses_everywhere(capsys, tmp_path / "nope", str(tmp_path / "nope"))


def test_hand_edited_manifest_is_refused_by_readers(bundle):
    """8.2 step 5 / 3.8: readers verify bundle_id on the manifest as stored."""
    edit_manifest(bundle, lambda m: m["pruning"].update(seed=12345))
    with pytest.raises(BundleError, match="bundle_id"):
        Bundle(bundle)
    with pytest.raises(BundleError, match="bundle_id"):
        load_pruned_model(bundle)


def test_unimplemented_family_is_refused(capsys, bundle):
    """3.3: readers refuse a family they do not implement, naming it and suggesting an upgrade."""
    edit_manifest(bundle, lambda m: m["architecture"].update(family="falcon"), resign=True)
    with pytest.raises(BundleError) as e:
        load_pruned_model(bundle)
    assert "falcon" in str(e.value) and "upgrade" in str(e.value)
    line = cli_error(capsys, "validate", bundle)
    assert "falcon" in line


SCHEMA_EDITS: dict[str, tuple[Callable[[dict], None], list[str]]] = {
    "ratio-1.5": (lambda m: m["pruning"].update(ratio=1.5), ["pruning/ratio"]),
    "ratio-string": (lambda m: m["pruning"].update(ratio="0.5"), ["pruning/ratio"]),
    "base-tensors-missing": (lambda m: m["base"].pop("tensors"), ["base", "tensors"]),
    "layer-kept-missing": (
        lambda m: m["architecture"]["layers"][3]["intermediate_size"].pop("kept"),
        ["architecture/layers/3/intermediate_size", "kept"],
    ),
    "files-size-negative": (lambda m: m["files"]["config.json"].update(size=-1), ["files/config.json/size"]),
    "index-maps-name": (lambda m: m.update(index_maps="maps.safetensors"), ["index_maps"]),
    "bundle-id-format": (lambda m: m.update(bundle_id="md5:abc"), ["bundle_id"]),
    "path-escapes": (lambda m: m["files"].update({"../outside.bin": {"sha256": "0" * 64, "size": 1}}), ["files"]),
}


@pytest.mark.parametrize("case", list(SCHEMA_EDITS))
def test_schema_violation_names_the_field(capsys, bundle, case):
    fn, needles = SCHEMA_EDITS[case]
    edit_manifest(bundle, fn, resign=case != "bundle-id-format")  # re-signing would repair that one
    refuses_everywhere(capsys, bundle, "schema", *needles)


# ---------------------------------------------------------------------------- corrupted weight files


def _garbage(p: Path) -> None:
    p.write_bytes(bytes((i * 131 + 7) % 256 for i in range(p.stat().st_size)))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _header_bomb(p: Path) -> None:
    """Valid header layout, but one tensor claims an enormous shape over the same bytes."""
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**31, 2**31]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def _header_too_long(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    p.write_bytes(bytes(data))


CORRUPTIONS = {"garbage": _garbage, "truncated": _truncate, "header-bomb": _header_bomb, "header-length": _header_too_long}


@pytest.mark.parametrize("refinalize", [False, True], ids=["hash-mismatch", "rehashed"])
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupted_weights_raise_bundle_error(capsys, bundle, how, refinalize):
    """Whether the hash catches it or (re-hashed by a forger) the parser must: always a BundleError."""
    CORRUPTIONS[how](bundle / "model.safetensors")
    if refinalize:
        finalize(bundle, read_manifest(bundle))
    with pytest.raises(BundleError) as e:
        load_pruned_model(bundle)
    assert "model.safetensors" in str(e.value)
    with pytest.raises(BundleError):  # verify=False skips hashing: the parser alone must refuse
        load_pruned_model(bundle, verify=False)
    validate_refuses(capsys, bundle, "model.safetensors")


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupted_index_maps_raise_bundle_error(capsys, bundle, how):
    CORRUPTIONS[how](bundle / "kept_indices.safetensors")
    finalize(bundle, read_manifest(bundle))
    with pytest.raises(BundleError) as e:
        Bundle(bundle).index_maps
    assert "kept_indices.safetensors" in str(e.value)
    validate_refuses(capsys, bundle, "kept_indices.safetensors")


# ---------------------------------------------------------------------------- broken base models given to prune


@pytest.fixture
def sharded_base(make_base_dir, tmp_path) -> Path:
    return writable_copy(make_base_dir(CASE, max_shard_size="400KB"), tmp_path / "base")


def _shards(base: Path) -> list[Path]:
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 1
    return shards


def _prune_refused(base: Path, tmp_path: Path, capsys, *needles: str) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(BaseModelError) as e:
        prune(base, outputs / "bundle", 0.5, show_progress=False)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert_no_output(outputs, "bundle")
    line = cli_error(capsys, "prune", base, "--out", outputs / "bundle", "--ratio", "0.5")
    for n in needles:
        assert n in line
    assert_no_output(outputs, "bundle")


def test_truncated_base_shard(capsys, sharded_base, tmp_path):
    shard = _shards(sharded_base)[1]
    _truncate(shard)
    _prune_refused(sharded_base, tmp_path, capsys, shard.name)


def test_garbage_base_shard(capsys, sharded_base, tmp_path):
    shard = _shards(sharded_base)[0]
    _garbage(shard)
    _prune_refused(sharded_base, tmp_path, capsys, shard.name)


def test_index_points_to_missing_shard(capsys, sharded_base, tmp_path):
    shard = _shards(sharded_base)[-1]
    shard.unlink()
    _prune_refused(sharded_base, tmp_path, capsys, shard.name, "missing")


def test_index_names_tensor_absent_from_its_shard(capsys, sharded_base, tmp_path):
    index = sharded_base / "model.safetensors.index.json"
    j = json.loads(index.read_text())
    j["weight_map"]["model.layers.0.mlp.extra.weight"] = _shards(sharded_base)[0].name
    index.write_text(json.dumps(j))
    _prune_refused(sharded_base, tmp_path, capsys, "model.layers.0.mlp.extra.weight")


def test_base_missing_a_layer_tensor(capsys, make_base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = writable_copy(make_base_dir(CASE), tmp_path / "base")
    w = load_file(str(base / "model.safetensors"))
    del w["model.layers.3.mlp.up_proj.weight"]
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    _prune_refused(base, tmp_path, capsys, "model.layers.3.mlp.up_proj.weight")


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_base_config_problems(capsys, make_base_dir, tmp_path, how):
    base = writable_copy(make_base_dir(CASE), tmp_path / "base")
    if how == "missing":
        (base / "config.json").unlink()
    else:
        (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    _prune_refused(base, tmp_path, capsys, "config.json")


# ---------------------------------------------------------------------------- issue 13: one reader contract


def test_an_unlisted_index_pointing_outside_the_bundle_is_never_followed(bundle, tmp_path, capsys):
    """Before: every reader followed model.safetensors.index.json to ../elsewhere and validate said sound."""
    from loramkit.bundle.model_dir import INDEX_NAME

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from safetensors.torch import load_file, save_file

    own = load_file(str(bundle / "model.safetensors"))
    save_file({k: torch.full_like(v, 7) for k, v in own.items()}, str(elsewhere / "model.safetensors"))
    (bundle / INDEX_NAME).write_text(json.dumps({"weight_map": {k: "../elsewhere/model.safetensors" for k in own}}))
    with Bundle(bundle).weights() as ckpt:  # the manifest's file, not the index's
        assert ckpt.files == ["model.safetensors"]
        name = next(iter(own))
        assert torch.equal(ckpt.get(name), own[name])
    model = load_pruned_model(bundle, dtype="float32")
    assert not any(bool((p == 7).all()) for p in model.parameters())
    problems, _ = validate(bundle)
    assert any(INDEX_NAME in p and "not listed" in p for p in problems), problems


def test_a_listed_index_cannot_map_tensors_out_of_the_directory(tmp_path, make_base_dir):
    from loramkit.bundle.model_dir import INDEX_NAME, Checkpoint

    base = writable_copy(make_base_dir(CASE), tmp_path / "base")
    (base / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "../elsewhere/model.safetensors"}}))
    with pytest.raises(BaseModelError, match="not a weight file of"):
        Checkpoint(base)


def test_the_tokenizer_is_read_only_from_verified_listed_files(bundle):
    """Before: train loaded tokenizer files that fail their sha256 (AutoTokenizer read the directory)."""
    from loramkit.train.setup import load_tokenizer

    tok, _ = load_tokenizer(bundle)  # sound: loads
    assert tok.vocab_size > 0
    cfg = bundle / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"model_max_length": 3, ', 1))
    with pytest.raises(BundleError, match="tokenizer_config.json: does not match its sha256"):
        load_tokenizer(bundle)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.__setitem__("requires", {"a": [1]}), "requires must be a list"),
        (lambda m: m.__setitem__("requires", [["x"]]), "requires must be a list"),
        (lambda m: m["base"]["tensors"][next(iter(m["base"]["tensors"]))].__setitem__("shape", [2**64, 1]), "64-bit range"),
        (lambda m: m.__setitem__("alignment", "DEEP"), "nest"),
        (lambda m: m.__setitem__("alignment", "SHALLOWER"), "nested more than 16 levels"),
    ],
    ids=["requires-dict", "requires-nested", "shape-beyond-int64", "deep-nesting", "nesting-beyond-schema"],
)
def test_crafted_manifests_are_one_line_refusals(bundle, capsys, edit, needle):
    """Before: tracebacks (unhashable requires, torch.Size overflow, RecursionError)."""
    m = read_manifest(bundle)
    edit(m)
    m["bundle_id"] = bundle_id(m)
    nested = {"DEEP": "[" * 50_000 + "]" * 50_000, "SHALLOWER": "[" * 40 + "]" * 40}  # beyond json's recursion limit / ours
    text = json.dumps(m)
    for tag, deep in nested.items():
        text = text.replace(f'"{tag}"', deep)
    (bundle / "loram.json").write_text(text)
    assert needle in cli_error(capsys, "validate", bundle)
    assert needle in cli_error(capsys, "inspect", bundle)


@pytest.mark.parametrize("how", ["negative", "duplicate", "unsorted", "float", "bad-key"])
def test_index_maps_validate_rejects_are_refused_by_every_reader(bundle, capsys, how):
    """Before: load and recover used negative, duplicate or unsorted maps that validate rejects."""
    from safetensors.torch import load_file, save_file

    maps = load_file(str(bundle / "kept_indices.safetensors"))
    key = next(k for k in sorted(maps) if k.endswith(":0") and len(maps[k]) > 2)
    t = maps[key].clone()
    if how == "negative":
        t[0] = -1
    elif how == "duplicate":
        t[1] = t[0]
    elif how == "unsorted":
        t[[0, 1]] = t[[1, 0]]
    elif how == "float":
        t = t.float()
    if how == "bad-key":
        maps[key.replace(":0", ":x")] = maps.pop(key)
    else:
        maps[key] = t
    save_file(maps, str(bundle / "kept_indices.safetensors"))
    rehash(bundle, "kept_indices.safetensors")
    with pytest.raises(BundleError, match="index map"):
        load_pruned_model(bundle)
    problems, _ = validate(bundle)
    assert any("index map" in p for p in problems), problems


def rehash(d: Path, rel: str) -> None:
    """Re-sign a tampered file as an attacker would: its sha256, size and the bundle_id all agree."""
    from loramkit.bundle.hashing import sha256_file

    m = read_manifest(d)
    m["files"][rel] = {"sha256": sha256_file(d / rel), "size": (d / rel).stat().st_size}
    write_manifest(d, m, resign=True)


# ---------------------------------------------------------------------------- issue 13: prune writes only what validate and the readers accept


def test_prune_refuses_a_base_revision_that_is_not_a_commit(capsys, make_base_dir, tmp_path):
    """Before: the bundle was written and validate then rejected it (base/revision not a sha)."""
    line = cli_error(capsys, "prune", make_base_dir(CASE), "--out", tmp_path / "b", "--ratio", "0.5", "--base-revision", "main")
    assert "--base-revision 'main' is not a commit sha" in line
    assert list(tmp_path.iterdir()) == []


def test_a_base_with_mixed_dtypes_prunes_into_a_sound_bundle(make_base_dir, tmp_path):
    """Before: weights.dtype 'mixed' beside base.dtype 'float32', which validate rejects."""
    from safetensors.torch import load_file, save_file

    base = writable_copy(make_base_dir(CASE), tmp_path / "base")
    w = load_file(str(base / "model.safetensors"))
    key = next(n for n in sorted(w) if "layers.0.mlp.up_proj" in n)
    w[key] = w[key].half()
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    prune(base, tmp_path / "b", 0.5, show_progress=False)
    problems, _ = validate(tmp_path / "b")
    assert problems == []
    load_pruned_model(tmp_path / "b")


def test_prune_refuses_a_base_lacking_a_norm(capsys, make_base_dir, tmp_path):
    """Before: prune wrote a bundle validate accepted and every reader then refused."""
    from safetensors.torch import load_file, save_file

    base = writable_copy(make_base_dir(CASE), tmp_path / "base")
    w = load_file(str(base / "model.safetensors"))
    del w[next(n for n in sorted(w) if "layers.1.post_attention_layernorm" in n)]
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert "a tensor (a norm?) is missing" in cli_error(capsys, "prune", base, "--out", tmp_path / "b", "--ratio", "0.5")
    assert not (tmp_path / "b").exists()
