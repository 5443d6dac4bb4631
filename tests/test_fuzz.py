"""Fuzzing the reader and output contracts (issue 13, specs/guarantees.md) with a seeded generator.

Generated hostile inputs: manifests (re-signed, so the bundle_id check passes), index maps and
safetensors headers (re-hashed and re-signed, as an attacker would), adapter configs, and CLI
arguments. Whatever the input, a command either succeeds or ends with exactly one ``error:``
line on stderr and exit 1 (2 for a usage error), never a traceback or an internal error, writes
nothing to stdout on failure, leaves no output behind, and never changes an input.

The generator is seeded (``random.Random(SEED + i)``), so CI runs the same cases every time; a
failure names its case number. Budget: about a minute for the whole module on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loramkit import cli, load_pruned_model
from loramkit.bundle.hashing import sha256_file
from loramkit.bundle.manifest import bundle_id
from loramkit.bundle.validate import validate
from loramkit.errors import LoramError
from tests.lora_helpers import LoramShop, copy_dir, edit_config, peft_on_base

SEED = 1313
CASE = "llama_gqa"
# Values an adversary puts anywhere: wrong types, beyond int64, huge, empty, nested, paths.
HOSTILE: list[Any] = [
    None, True, False, -1, 0, 1, 7, 2**31, 2**63, 2**64, -(2**70), 0.5, -0.0, 1e308, float("nan"), float("inf"),
    "", "x", "../outside", "/etc/passwd", "model.safetensors", "A" * 300, [], [1, 2], [[[]]], ["a", 1], {}, {"a": [1]},
]  # fmt: skip


@pytest.fixture(scope="module")
def shop(tmp_path_factory, make_base_dir) -> LoramShop:
    return LoramShop(tmp_path_factory, make_base_dir)


@pytest.fixture(scope="module")
def bundle(shop) -> Path:
    return shop.bundle(CASE)


@pytest.fixture(scope="module")
def adapter(shop, bundle, tmp_path_factory) -> Path:
    """The pruned-model adapter, without the evidence that binds it to one bundle id (fuzzed bundles re-sign)."""
    out = copy_dir(shop.adapter(bundle), tmp_path_factory.mktemp("fuzz_adapter") / "adapter")
    for evidence in ("README.md", "loram_adapter.json"):
        (out / evidence).unlink(missing_ok=True)
    edit_config(out, base_model_name_or_path=None)
    return out


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: an input is intact when this does not change."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run(capsys, *args: object) -> tuple[int, str, str]:
    rc = cli.run([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_contract(case: int, rc: int, out: str, err: str, *, success_ok: bool = True) -> None:
    """Exit 0, or one 'error:' line and exit 1 (a usage error: exit 2); no traceback, no internal error."""
    where = f"case {case}: rc={rc} err={err[-600:]!r}"
    assert "Traceback" not in err and "internal error" not in err, where
    if rc == 0:
        assert success_ok, where
        return
    assert rc in (1, 2), where
    if rc == 1:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert out == "", where


def resign(d: Path, m: Any, rehash: tuple[str, ...] = ()) -> None:
    """Write ``m`` as the manifest with hashes and bundle_id recomputed where its shape allows."""
    try:
        for rel in rehash:
            m["files"][rel] = {"sha256": sha256_file(d / rel), "size": (d / rel).stat().st_size}
        m["bundle_id"] = bundle_id(m)
    except Exception:  # a manifest too broken to sign: written as is (the readers must still cope)
        pass
    (d / "loram.json").write_text(json.dumps(m, allow_nan=True))


def paths_of(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices)."""
    out = [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out += paths_of(v, prefix + (k,))
    return out


def mutate_json(rng: random.Random, doc: Any, protect: tuple = ()) -> Any:
    """One to three random edits: replace a value, delete a key, add a key, wrap or deepen a value."""
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in paths_of(doc) if p and p[0] not in protect] or [()])
        if not path:
            break
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key, op = path[-1], rng.random()
        if op < 0.6:
            parent[key] = rng.choice(HOSTILE)
        elif op < 0.75 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.9 and isinstance(parent, dict):
            parent[rng.choice(["extra", "../x", "", "requires"])] = rng.choice(HOSTILE)
        else:
            parent[key] = [parent[key]] if rng.random() < 0.5 else {"v": parent[key]}
    return doc


# ---------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("case", range(80))
def test_fuzzed_manifests(capsys, bundle, tmp_path, case):
    rng = random.Random(SEED + case)
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    m = mutate_json(rng, json.loads((d / "loram.json").read_text()), protect=("bundle_id",))
    resign(d, m)
    before = tree(d)
    rc, out, err = run(capsys, "inspect", d)
    assert_contract(case, rc, out, err)
    try:
        validate(d)
    except LoramError as exc:
        assert "\n" not in str(exc)
    assert tree(d) == before


# ---------------------------------------------------------------------------- index maps


def _mutate_maps(rng: random.Random, maps: dict[str, torch.Tensor]) -> str:
    key = rng.choice(sorted(k for k, t in maps.items() if t.numel() > 2))
    t = maps[key].clone()
    op = rng.choice(["negative", "duplicate", "swap", "flip", "dtype", "2d", "drop", "bogus-key", "empty", "beyond", "shift"])
    if op == "negative":
        t[rng.randrange(len(t))] = -rng.randint(1, 10)
    elif op == "duplicate":
        i = rng.randrange(1, len(t))
        t[i] = t[i - 1]
    elif op == "swap":
        t[[0, -1]] = t[[-1, 0]]
    elif op == "flip":
        t = t.flip(0)
    elif op == "dtype":
        t = t.to(rng.choice([torch.int32, torch.float32, torch.uint8, torch.float64]))
    elif op == "2d":
        t = t[: len(t) // 2 * 2].reshape(2, -1)
    elif op == "drop":
        del maps[key]
        return op
    elif op == "bogus-key":
        maps[rng.choice(["x:0", key.rsplit(":", 1)[0] + ":9", key.rsplit(":", 1)[0] + ":-1", key + "x", ":0"])] = t
        return op
    elif op == "empty":
        t = t[:0]
    elif op == "beyond":
        t[-1] = 2**40
    else:
        t = t + 1
    maps[key] = t
    return op


@pytest.mark.parametrize("case", range(40))
def test_fuzzed_index_maps(capsys, bundle, adapter, tmp_path, case):
    from safetensors.torch import load_file, save_file

    rng = random.Random(SEED + 100 + case)
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    maps = load_file(str(d / "kept_indices.safetensors"))
    op = _mutate_maps(rng, maps)
    save_file(maps, str(d / "kept_indices.safetensors"))
    resign(d, json.loads((d / "loram.json").read_text()), ("kept_indices.safetensors",))
    before = tree(d), tree(adapter)
    rc, out, err = run(capsys, "recover", adapter, "--bundle", d, "--out", tmp_path / "out")
    assert_contract(case, rc, out, err, success_ok=False)  # every edit breaks the maps
    assert not (tmp_path / "out").exists()
    problems, _ = validate(d)
    assert problems, f"case {case} ({op}): validate calls a broken bundle sound"
    assert (tree(d), tree(adapter)) == before


# ---------------------------------------------------------------------------- safetensors headers


def _mutate_header(rng: random.Random, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    op = rng.random()
    if op < 0.15:  # the length prefix lies
        return struct.pack("<Q", rng.choice([0, n + 1, len(raw), 2**63, 2**64 - 1])) + raw[8:]
    if op < 0.25:  # truncated or garbage
        return (
            raw[: rng.randrange(0, len(raw))]
            if rng.random() < 0.5
            else raw[:8] + bytes(rng.randrange(256) for _ in range(n)) + body
        )
    name = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets"])
    header[name][field] = rng.choice(
        {
            "dtype": ["F64", "I8", "BOOL", "F8_E4M3", "U8", "X", 7, None],
            "shape": [[], [0], [-1, 2], [2**63, 1], [1] * 40, "2", [1.5]],
            "data_offsets": [[0, 0], [-8, 8], [0, 2**64], [8, 0], [0, len(body) + 64], [1, 2, 3], "0"],
        }[field]  # fmt: skip
    )
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("case", range(60))
def test_fuzzed_safetensors_headers(capsys, bundle, tmp_path, case):
    rng = random.Random(SEED + 200 + case)
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    w = d / "model.safetensors"
    w.write_bytes(_mutate_header(rng, w.read_bytes()))
    resign(d, json.loads((d / "loram.json").read_text()), ("model.safetensors",))
    before = tree(d)
    rc, out, err = run(capsys, "inspect", d)
    assert_contract(case, rc, out, err)
    try:
        problems, _ = validate(d)
        load_pruned_model(d)
        assert not problems, f"case {case}: loads though validate reports {problems}"
    except LoramError as exc:
        assert "\n" not in str(exc), f"case {case}: {exc}"
    assert tree(d) == before


# ---------------------------------------------------------------------------- adapter configs

_ADAPTER_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type", "use_dora",
                 "use_rslora", "fan_in_fan_out", "lora_dropout", "layers_to_transform", "modules_to_save"]  # fmt: skip


@pytest.mark.parametrize("case", range(40))
def test_fuzzed_adapter_configs(capsys, shop, bundle, adapter, tmp_path, case):
    """Recover either refuses in one line or writes an adapter PEFT loads on the original base."""
    rng = random.Random(SEED + 300 + case)
    a = copy_dir(adapter, tmp_path / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    for key in rng.sample(_ADAPTER_KEYS, rng.randint(1, 2)):
        cfg[key] = rng.choice(HOSTILE + [["q_proj"], ["q_proj", "nope"], ".*q_proj", {"q_proj": 2}, {"q_proj": float("nan")}])
    (a / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))
    before = tree(a), tree(bundle)
    out = tmp_path / "out"
    rc, so, err = run(capsys, "recover", a, "--bundle", bundle, "--out", out)
    assert_contract(case, rc, so, err)
    if rc == 0:
        peft_on_base(shop.base(CASE), out)  # what the user does next must work
    else:
        assert not out.exists()
    assert (tree(a), tree(bundle)) == before


# ---------------------------------------------------------------------------- CLI arguments

_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "", "1e-320", "0x10", "3.5", "-0"]


def _cli_cases(base: Path, bundle: Path, adapter: Path, data: Path, out: Path) -> list[Callable[[str], list[object]]]:
    return [
        lambda v: ["plan", base, "--ratio", v],
        lambda v: ["plan", base, "--ratio", "0.5", "--lora-rank", v],
        lambda v: ["prune", base, "--out", out, "--ratio", v],
        lambda v: ["prune", base, "--out", out, "--ratio", "0.5", "--keep-first", v],
        lambda v: ["prune", base, "--out", out, "--ratio", "0.5", "--max-shard-size", v],
        lambda v: ["quantize", bundle, "--out", out, "--blocksize", v],
        lambda v: ["eval", bundle, "--data", data, "--micro-batch", v],
        lambda v: ["eval", bundle, "--data", data, "--seq-len", v],
        lambda v: ["train", bundle, "--data", data, "--out", out, "--max-steps", "1", "--lr", v],
        lambda v: ["train", bundle, "--data", data, "--out", out, "--max-steps", "1", "--alpha", v],
        lambda v: ["train", bundle, "--data", data, "--out", out, "--max-steps", v],
        lambda v: ["recover", adapter, "--bundle", bundle, "--out", v or out],
    ]


@pytest.mark.parametrize("case", range(60))
def test_fuzzed_cli_arguments(capsys, shop, bundle, adapter, tmp_path, monkeypatch, case):
    rng = random.Random(SEED + 400 + case)
    monkeypatch.chdir(tmp_path)  # a value taken as a relative --out lands here
    data = tmp_path / "data.txt"
    data.write_text("\n".join(f"line {i} of some text to read" for i in range(8)) + "\n")
    out = tmp_path / "out"
    base = shop.base(CASE)
    make = rng.choice(_cli_cases(base, bundle, adapter, data, out))
    value = rng.choice(_NUMBERS + ["org/a--b", str(bundle), str(adapter), str(base)])
    before = tree(base), tree(bundle), tree(adapter)
    rc, so, err = run(capsys, *make(value))
    assert_contract(case, rc, so, err)
    if rc != 0:
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"], f"case {case}: output left"
    assert (tree(base), tree(bundle), tree(adapter)) == before, f"case {case}: an input changed"
