"""Streaming structured pruning (loramkit.prune.pruner.prune) into a bundle.

The bundle is checked against the base with independent readers (json + the safetensors
library) and independent oracles: the spec's index-map geometry, bitwise slices, the
weight fingerprint over the raw stored bytes, top-k by L2 norm over each coupled group,
and first-order Taylor scores from a plain transformers model and loss.backward().
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import loramkit.prune.pruner as pruner_mod
from loramkit.errors import LoramError, OutputExistsError
from loramkit.prune.pruner import prune
from tests.factory import expected_shapes, sample_texts, tiny_model, tiny_tokenizer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# ============================================================================ helpers


def read_base(base_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def raw_sha256(base_dir: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes exactly as stored in the base files (own header parse)."""
    out = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, e in header.items():
            b, end = e["data_offsets"]
            out[name] = hashlib.sha256(raw[8 + n + b : 8 + n + end]).hexdigest()
    return out


def read_bundle(bundle: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    m = json.loads((bundle / "loram.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for f in m["weights"]["files"]:
        part = load_file(str(bundle / f))
        assert not set(part) & set(weights)
        weights |= part
    maps = load_file(str(bundle / "kept_indices.safetensors"))
    return m, weights, maps


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """The spec's expand(S): [s*width + t for s in sorted(S) for t in range(width)]."""
    units = torch.as_tensor(units, dtype=torch.int64).sort().values
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


# Phi-3 stores q | k | v rows in qkv_proj and gate | up rows in gate_up_proj (transformers'
# Phi3Attention / Phi3MLP). The oracles here speak of separate projections: split first.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def unfuse(tensors: dict[str, torch.Tensor], case: str, maps: bool = False) -> dict[str, torch.Tensor]:
    """Base tensors (or index maps, ``maps=True``) with each fused projection split into its parts' rows."""
    s = expected_shapes(case)
    rows = {"q_proj": s["q_out"], "k_proj": s["kv_out"], "v_proj": s["kv_out"]}
    rows |= {"gate_proj": s["intermediate_size"], "up_proj": s["intermediate_size"]}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        fused = next((f for f in FUSED if f".{f}." in key), None)
        if fused is None or key.endswith(":1"):
            out[key] = t
            continue
        start = 0
        for part in FUSED[fused]:
            n = rows[part.rsplit(".", 1)[1]]
            new = key.replace(fused, part)
            out[new] = t[(t >= start) & (t < start + n)] - start if maps else t[start : start + n]
            start += n
        assert maps or start == t.shape[0], key  # the parts tile the fused rows
    return out


def kept_sets(maps: dict[str, torch.Tensor], case: str, layer: int) -> tuple[list[int] | None, list[int] | None]:
    """(kept kv groups, kept channels) of one layer from its maps; None where the block is whole."""
    maps = unfuse(maps, case, maps=True)
    hd = expected_shapes(case)["head_dim"]
    p = layer_prefix(layer)
    k = maps.get(p + "self_attn.k_proj.weight:0")
    g = maps.get(p + "mlp.gate_proj.weight:0")
    return (None if k is None else (k[::hd] // hd).tolist()), (None if g is None else g.tolist())


def check_bundle(bundle: Path, base_dir: Path, case: str) -> dict[str, Any]:
    """Every geometric and bitwise property the spec requires of a fresh (unaligned) bundle."""
    shp = expected_shapes(case)
    hd, G, H, Hkv, I = (
        shp["head_dim"],
        shp["group_size"],
        shp["num_attention_heads"],
        shp["num_key_value_heads"],
        shp["intermediate_size"],
    )
    base = read_base(base_dir)
    m, stored, maps = read_bundle(bundle)

    # ---- index maps: form
    for key, t in maps.items():
        name, dim = key.rsplit(":", 1)
        assert name in base, key
        size = base[name].shape[int(dim)]
        assert t.dtype == torch.int64 and t.dim() == 1 and t.numel() > 0, key
        assert bool((t[1:] > t[:-1]).all()), f"{key} not strictly ascending"
        assert int(t.min()) >= 0 and int(t.max()) < size, key
        assert t.numel() < size, f"{key} removes nothing"

    # ---- index maps: coupled groups, per layer (of the separate projections)
    fused_maps, maps = maps, unfuse(maps, case, maps=True)
    pr = m["pruning"]
    first, last, L = pr["keep_first"], pr["keep_last"], shp["num_hidden_layers"]
    want_keys: set[str] = set()
    layers = m["architecture"]["layers"]
    assert [d["index"] for d in layers] == list(range(L))
    for d in layers:
        i, p = d["index"], layer_prefix(d["index"])
        kv_k, h_k, i_k = d["num_key_value_heads"]["kept"], d["num_attention_heads"]["kept"], d["intermediate_size"]["kept"]
        assert d["num_key_value_heads"]["original"] == Hkv and d["num_attention_heads"]["original"] == H
        assert d["intermediate_size"]["original"] == I
        assert d["pruned"] == (kv_k < Hkv or h_k < H or i_k < I)
        if not (first <= i < L - last):
            assert not d["pruned"]
        assert h_k == kv_k * G
        if kv_k < Hkv:
            kmap = maps[p + "self_attn.k_proj.weight:0"]
            K = kmap[::hd] // hd
            assert len(K) == kv_k
            assert torch.equal(kmap, expand(K, hd)), "k map is not whole head blocks"
            assert torch.equal(maps[p + "self_attn.v_proj.weight:0"], kmap)
            Q = expand(K, G)  # query heads of the kept groups
            assert len(Q) == h_k
            qrows = expand(Q, hd)
            assert torch.equal(maps[p + "self_attn.q_proj.weight:0"], qrows)
            assert torch.equal(maps[p + "self_attn.o_proj.weight:1"], qrows)
            want_keys |= {p + f"self_attn.{r}.weight:0" for r in ("q_proj", "k_proj", "v_proj")}
            want_keys.add(p + "self_attn.o_proj.weight:1")
            for r in ("q_proj", "k_proj", "v_proj"):
                if p + f"self_attn.{r}.bias" in base:
                    assert torch.equal(maps[p + f"self_attn.{r}.bias:0"], maps[p + f"self_attn.{r}.weight:0"])
                    want_keys.add(p + f"self_attn.{r}.bias:0")
        if i_k < I:
            gmap = maps[p + "mlp.gate_proj.weight:0"]
            assert len(gmap) == i_k
            assert torch.equal(maps[p + "mlp.up_proj.weight:0"], gmap)
            assert torch.equal(maps[p + "mlp.down_proj.weight:1"], gmap)
            want_keys |= {p + "mlp.gate_proj.weight:0", p + "mlp.up_proj.weight:0", p + "mlp.down_proj.weight:1"}
    assert set(maps) == want_keys, "maps exist exactly for the pruned dimensions"
    assert pr["pruned_layers"] == [d["index"] for d in layers if d["pruned"]]
    maps = fused_maps

    # ---- weights: same names, bitwise slices / copies
    assert set(stored) == set(base), "stored tensors are the base's (tied lm_head absent)"
    if shp["tied"]:
        assert "lm_head.weight" not in stored
    for name, t in base.items():
        want = t
        for dim in range(t.dim()):
            idx = maps.get(f"{name}:{dim}")
            if idx is not None:
                want = want.index_select(dim, idx)
        got = stored[name]
        assert got.dtype == t.dtype and tuple(got.shape) == tuple(want.shape), name
        assert bits(got) == bits(want), f"{name} differs from the base indexed by its maps"

    # ---- fingerprint and counts
    raw = raw_sha256(base_dir)
    tens = m["base"]["tensors"]
    assert set(tens) == set(base)
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name, t in base.items():
        assert tens[name] == {"dtype": codes[t.dtype], "shape": list(t.shape), "sha256": raw[name]}, name
    n_base = sum(t.numel() for t in base.values())
    assert m["base"]["num_parameters"] == m["parameters"]["original"] == n_base
    assert m["parameters"]["pruned"] == sum(t.numel() for t in stored.values())

    # ---- file hashes in the manifest are the files' hashes
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "loram.json"}
    assert set(m["files"]) == on_disk
    for rel, e in m["files"].items():
        data = (bundle / rel).read_bytes()
        assert e == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel
    return m


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def bundle_of(make_base_dir, tmp_path_factory):
    """``bundle_of(case, ratio=0.5, base_kw=None, **prune_kw) -> Path``, built once per module."""
    cache: dict[str, Path] = {}

    def _make(case: str, ratio: float = 0.5, base_kw: dict | None = None, **kw) -> Path:
        key = repr((case, ratio, sorted((base_kw or {}).items()), sorted(kw.items())))
        if key not in cache:
            base = make_base_dir(case, **(base_kw or {}))
            out = tmp_path_factory.mktemp("bundle") / "b"
            prune(base, out, ratio, show_progress=False, **kw)
            cache[key] = out
        return cache[key]

    return _make


# ============================================================================ geometry + bitwise


def test_bundle_properties_every_family(bundle_of, make_base_dir, family_case):
    b = bundle_of(family_case)
    m = check_bundle(b, make_base_dir(family_case), family_case)
    shp = expected_shapes(family_case)
    # the package's planner and parameter count agree with what was written
    from loramkit.families import ArchSpec
    from loramkit.families.geometry import LayerDims, count_parameters
    from loramkit.families.pruning_rules import plan_layers

    arch = ArchSpec.from_config(json.loads((b / "config.json").read_text()))
    layers = [LayerDims.from_json(d) for d in m["architecture"]["layers"]]
    assert layers == plan_layers(arch, 0.5)[0]
    assert count_parameters(arch, layers) == m["parameters"]["pruned"]
    assert count_parameters(arch, plan_layers(arch, 0.0)[0]) == m["parameters"]["original"]
    # 8 layers, defaults for a shallow model: keep 2 first and 1 last
    assert (m["pruning"]["keep_first"], m["pruning"]["keep_last"]) == (2, 1)
    assert m["pruning"]["pruned_layers"] == [2, 3, 4, 5, 6]
    assert m["pruning"]["importance"] == "magnitude" and m["pruning"]["ratio"] == 0.5
    assert m["pruning"]["calibration"] is None
    # both blocks really pruned at 0.5
    _, _, maps = read_bundle(b)
    for i in range(2, 7):
        K, C = kept_sets(maps, family_case, i)
        kv_expected = shp["num_key_value_heads"] // 2 if shp["group_size"] > 1 else shp["num_attention_heads"] // 2
        assert K is not None and len(K) == kv_expected
        assert C is not None and len(C) == shp["intermediate_size"] // 2


@pytest.mark.parametrize("case", ["llama_mha", "llama_gqa", "qwen2"])
@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
def test_bundle_properties_other_ratios_random(bundle_of, make_base_dir, case, ratio):
    check_bundle(bundle_of(case, ratio, importance="random", seed=5), make_base_dir(case), case)


def test_bundle_properties_bf16_base_and_explicit_keep(bundle_of, make_base_dir):
    b = bundle_of("qwen3", 0.65, base_kw={"dtype": torch.bfloat16}, keep_first=1, keep_last=0)
    m = check_bundle(b, make_base_dir("qwen3", dtype=torch.bfloat16), "qwen3")
    assert m["pruning"]["pruned_layers"] == list(range(1, 8))
    assert m["base"]["dtype"] == m["weights"]["dtype"] == "bfloat16"


# ============================================================================ random importance


def test_random_is_deterministic_per_seed(make_base_dir, tmp_path):
    base = make_base_dir("llama_gqa")
    a = prune(base, tmp_path / "a", 0.5, importance="random", seed=7, show_progress=False)
    b = prune(base, tmp_path / "b", 0.5, importance="random", seed=7, show_progress=False)
    c = prune(base, tmp_path / "c", 0.5, importance="random", seed=8, show_progress=False)
    ma, mb, mc = (load_file(str(tmp_path / x / "kept_indices.safetensors")) for x in "abc")
    assert set(ma) == set(mb) == set(mc)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert a["bundle_id"] == b["bundle_id"]  # same content, same identity
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # another seed: different channels in every pruned layer
    for i in a["pruning"]["pruned_layers"]:
        k = f"model.layers.{i}.mlp.gate_proj.weight:0"
        assert not torch.equal(ma[k], mc[k]), i
    assert c["bundle_id"] != a["bundle_id"] and c["pruning"]["seed"] == 8


def test_random_ignores_the_weights(make_base_dir, tmp_path):
    m1 = prune(make_base_dir("llama_mha"), tmp_path / "a", 0.5, importance="random", seed=3, show_progress=False)
    prune(make_base_dir("llama_mha", seed=1), tmp_path / "b", 0.5, importance="random", seed=3, show_progress=False)
    ma, mb = (load_file(str(tmp_path / x / "kept_indices.safetensors")) for x in "ab")
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    # ...but it does not pick the same units in every layer
    layers = m1["pruning"]["pruned_layers"]
    chans = {tuple(ma[f"model.layers.{i}.mlp.gate_proj.weight:0"].tolist()) for i in layers}
    assert len(chans) == len(layers)


# ============================================================================ magnitude importance


def group_l2(base: dict[str, torch.Tensor], case: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm over every weight (and row bias) of each KV group and each MLP channel."""
    s = expected_shapes(case)
    hd, G, Hkv, I = s["head_dim"], s["group_size"], s["num_key_value_heads"], s["intermediate_size"]
    p = layer_prefix(layer)
    base = unfuse(base, case)
    w = lambda n: base[p + n].double()  # noqa: E731
    kv = torch.zeros(Hkv, dtype=torch.float64)
    for g in range(Hkv):
        q = slice(g * G * hd, (g + 1) * G * hd)
        k = slice(g * hd, (g + 1) * hd)
        kv[g] = (
            w("self_attn.q_proj.weight")[q].square().sum()
            + w("self_attn.k_proj.weight")[k].square().sum()
            + w("self_attn.v_proj.weight")[k].square().sum()
            + w("self_attn.o_proj.weight")[:, q].square().sum()
        )
        for r, rows in (("q_proj", q), ("k_proj", k), ("v_proj", k)):
            if p + f"self_attn.{r}.bias" in base:
                kv[g] += w(f"self_attn.{r}.bias")[rows].square().sum()
    ch = (
        w("mlp.gate_proj.weight").square().sum(1)
        + w("mlp.up_proj.weight").square().sum(1)
        + w("mlp.down_proj.weight").square().sum(0)
    )
    for r in ("gate_proj", "up_proj"):
        if p + f"mlp.{r}.bias" in base:
            ch += w(f"mlp.{r}.bias").square()
    assert ch.shape == (I,)
    return kv.sqrt(), ch.sqrt()


def topk_set(scores: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))  # ties -> lower index
    return sorted(order[:k])


def assert_topk(scores: torch.Tensor, kept: list[int], what: str) -> None:
    k = len(kept)
    assert kept == topk_set(scores, k), what
    removed = [j for j in range(len(scores)) if j not in kept]
    if removed:  # a clear margin, so the exact-set comparison is not a coin toss
        assert float(scores[kept].min()) > float(scores[removed].max()), what


def test_magnitude_keeps_top_l2_groups(bundle_of, make_base_dir, family_case):
    base = read_base(make_base_dir(family_case))
    b = bundle_of(family_case)
    m, _, maps = read_bundle(b)
    for i in m["pruning"]["pruned_layers"]:
        kv, ch = group_l2(base, family_case, i)
        K, C = kept_sets(maps, family_case, i)
        assert_topk(kv, K, f"layer {i} kv groups")
        assert_topk(ch, C, f"layer {i} channels")


def _planted_base(tmp_path: Path, case: str, plant) -> Path:
    model = tiny_model(case)
    with torch.no_grad():
        plant({n: p for n, p in model.named_parameters()})
    d = tmp_path / "planted"
    model.save_pretrained(d, safe_serialization=True)
    return d


# (case, where to plant, which block) ; the planted unit is the one the unplanted base ranks LAST
PLANTS = [
    ("llama_gqa", "q_proj.weight", "kv"),
    ("llama_gqa", "k_proj.weight", "kv"),
    ("llama_gqa", "v_proj.weight", "kv"),
    ("llama_gqa", "o_proj.weight", "kv"),
    ("llama_mha", "o_proj.weight", "kv"),
    ("qwen2", "q_proj.bias", "kv"),
    ("qwen2", "k_proj.bias", "kv"),
    ("qwen2", "v_proj.bias", "kv"),
    ("mistral", "gate_proj.weight", "ch"),
    ("mistral", "up_proj.weight", "ch"),
    ("mistral", "down_proj.weight", "ch"),
]


@pytest.mark.parametrize("case,where,block", PLANTS)
def test_magnitude_counts_every_member_of_a_coupled_group(make_base_dir, tmp_path, case, where, block):
    layer = 3
    s = expected_shapes(case)
    hd, G = s["head_dim"], s["group_size"]
    kv0, ch0 = group_l2(read_base(make_base_dir(case)), case, layer)
    target = int((kv0 if block == "kv" else ch0).argmin())  # would be removed without the plant
    p = layer_prefix(layer) + ("self_attn." if block == "kv" else "mlp.")
    name = p + where
    big = 50.0

    def plant(params):
        t = params[name]
        if block == "kv":
            rows = (
                slice(target * G * hd, (target + 1) * G * hd)
                if where.startswith(("q_proj", "o_proj"))
                else slice(target * hd, (target + 1) * hd)
            )
            if where.startswith("o_proj"):
                t[:, rows] = big
            else:
                t[rows] = big
        else:
            if where.startswith("down_proj"):
                t[:, target] = big
            else:
                t[target] = big

    base = _planted_base(tmp_path, case, plant)
    prune(base, tmp_path / "out", 0.5, show_progress=False)
    maps = load_file(str(tmp_path / "out" / "kept_indices.safetensors"))
    K, C = kept_sets(maps, case, layer)
    kept = K if block == "kv" else C
    assert target in kept, f"planting large values in {where} of unit {target} must make it kept"
    # and the planted base still obeys the oracle everywhere
    kv, ch = group_l2(read_base(base), case, layer)
    assert_topk(kv if block == "kv" else ch, kept, where)


def test_magnitude_ignores_unit_independent_tensors(tmp_path, make_base_dir):
    """Norms, o_proj rows and embeddings belong to no unit: scaling them changes no choice."""
    case = "llama_gqa"

    def plant(params):
        for n, t in params.items():
            if "norm" in n or "embed" in n:
                t.mul_(7.0)

    base = _planted_base(tmp_path, case, plant)
    prune(base, tmp_path / "out", 0.5, show_progress=False)
    prune(make_base_dir(case), tmp_path / "ref", 0.5, show_progress=False)
    a = load_file(str(tmp_path / "out" / "kept_indices.safetensors"))
    b = load_file(str(tmp_path / "ref" / "kept_indices.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================ taylor importance


def _calibration(tmp_path: Path, n: int, suffix: str = ".txt") -> tuple[Path, list[str]]:
    texts = sample_texts(n, seed=11)
    p = tmp_path / f"calib{suffix}"
    if suffix == ".txt":
        p.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    else:
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return p, texts


def packed_blocks(base_dir: Path, texts: list[str], samples: int, seq_len: int) -> torch.Tensor:
    """The calibration blocks the spec records: passages tokenized (special tokens on), concatenated, cut."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    stream = [t for text in texts for t in tok(text)["input_ids"]]
    n = min(samples, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def independent_taylor(base_dir: Path, case: str, layers: list[int], ids: torch.Tensor):
    """sum over each coupled group of |w * dL/dw|, L the mean token loss of ONE float64 forward over all blocks."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    model.eval()
    s = expected_shapes(case)
    hd, G, Hkv, I = s["head_dim"], s["group_size"], s["num_key_value_heads"], s["intermediate_size"]
    params = dict(model.named_parameters())
    model(input_ids=ids, labels=ids).loss.backward()
    kv = {i: torch.zeros(Hkv, dtype=torch.float64) for i in layers}
    ch = {i: torch.zeros(I, dtype=torch.float64) for i in layers}
    for i in layers:
        p = layer_prefix(i)
        sc = lambda n: (params[p + n].detach() * params[p + n].grad).abs()  # noqa: E731
        for g in range(Hkv):
            q = slice(g * G * hd, (g + 1) * G * hd)
            k = slice(g * hd, (g + 1) * hd)
            kv[i][g] += (
                sc("self_attn.q_proj.weight")[q].sum()
                + sc("self_attn.k_proj.weight")[k].sum()
                + sc("self_attn.v_proj.weight")[k].sum()
                + sc("self_attn.o_proj.weight")[:, q].sum()
            )
            for r, rows in (("q_proj", q), ("k_proj", k), ("v_proj", k)):
                if p + f"self_attn.{r}.bias" in params:
                    kv[i][g] += sc(f"self_attn.{r}.bias")[rows].sum()
        ch[i] += sc("mlp.gate_proj.weight").sum(1) + sc("mlp.up_proj.weight").sum(1) + sc("mlp.down_proj.weight").sum(0)
    return kv, ch


@pytest.mark.parametrize("case", ["qwen2", "llama_mha", "qwen3"])
def test_taylor_matches_independent_gradients(make_base_dir, tmp_path, case):
    base = make_base_dir(case)
    calib, texts = _calibration(tmp_path, 9)
    n_samples, seq_len = 6, 16  # 6 full blocks of the packed text: two micro-batches (4 + 2)
    m = prune(
        base,
        tmp_path / "out",
        0.5,
        importance="taylor",
        calibration=calib,
        calibration_samples=n_samples,
        calibration_seq_len=seq_len,
        show_progress=False,
    )
    check_bundle(tmp_path / "out", base, case)
    layers = m["pruning"]["pruned_layers"]
    ids = packed_blocks(base, texts, n_samples, seq_len)
    kv, ch = independent_taylor(base, case, layers, ids)
    cal = m["pruning"]["calibration"]
    assert m["pruning"]["importance"] == "taylor"
    assert cal["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert cal["source"] == "calib.txt"
    assert cal["num_samples"] == n_samples and cal["seq_len"] == seq_len
    assert cal["num_tokens"] == ids.numel() == n_samples * seq_len
    maps = load_file(str(tmp_path / "out" / "kept_indices.safetensors"))
    for i in layers:
        K, C = kept_sets(maps, case, i)
        assert_topk(kv[i], K, f"taylor layer {i} kv")
        assert_topk(ch[i], C, f"taylor layer {i} channels")


def test_taylor_jsonl_equals_txt(make_base_dir, tmp_path):
    base = make_base_dir("llama_gqa")
    txt, _ = _calibration(tmp_path, 5)
    jsonl, _ = _calibration(tmp_path, 5, ".jsonl")
    a = prune(base, tmp_path / "a", 0.5, importance="taylor", calibration=txt, show_progress=False)
    b = prune(base, tmp_path / "b", 0.5, importance="taylor", calibration=jsonl, show_progress=False)
    ma, mb = (load_file(str(tmp_path / x / "kept_indices.safetensors")) for x in "ab")
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert a["pruning"]["calibration"]["sha256"] != b["pruning"]["calibration"]["sha256"]
    assert a["pruning"]["calibration"]["num_tokens"] == b["pruning"]["calibration"]["num_tokens"]


@pytest.mark.parametrize("ratio,keep", [(0.0, {}), (0.5, {"keep_first": 4, "keep_last": 4})], ids=["ratio0", "no-eligible-layer"])
def test_taylor_with_nothing_to_prune(make_base_dir, tmp_path, ratio, keep):
    base = make_base_dir("llama_gqa")
    calib, _ = _calibration(tmp_path, 4)
    m = prune(base, tmp_path / "out", ratio, importance="taylor", calibration=calib, show_progress=False, **keep)
    check_bundle(tmp_path / "out", base, "llama_gqa")
    assert m["pruning"]["pruned_layers"] == []
    assert m["pruning"]["calibration"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert m["pruning"]["calibration"]["num_samples"] == 1  # 4 short passages: less than one 512-token block


def test_taylor_needs_calibration(make_base_dir, tmp_path):
    with pytest.raises(LoramError, match="calibration"):
        prune(make_base_dir("llama_gqa"), tmp_path / "out", 0.5, importance="taylor", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_importance_refused(make_base_dir, tmp_path):
    with pytest.raises(LoramError, match="importance"):
        prune(make_base_dir("llama_gqa"), tmp_path / "out", 0.5, importance="l1", show_progress=False)
    assert not (tmp_path / "out").exists()


# ============================================================================ sharding


def test_sharded_base_gives_the_same_bundle_weights(make_base_dir, bundle_of, tmp_path):
    case = "qwen2"
    sharded = make_base_dir(case, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    prune(sharded, tmp_path / "s", 0.5, show_progress=False)
    check_bundle(tmp_path / "s", sharded, case)
    ref = bundle_of(case)
    m_s, m_r = (json.loads((d / "loram.json").read_text()) for d in (tmp_path / "s", ref))
    assert m_s["base"]["tensors"] == m_r["base"]["tensors"]  # the fingerprint ignores the file layout
    for f in ("model.safetensors", "kept_indices.safetensors"):
        assert (tmp_path / "s" / f).read_bytes() == (ref / f).read_bytes(), f


def test_bundle_sharding(make_base_dir, bundle_of, tmp_path):
    from loramkit.model.loader import load_pruned_model

    case = "llama_gqa"
    base = make_base_dir(case)
    limit = 100_000
    m = prune(base, tmp_path / "out", 0.5, max_shard_size=limit, show_progress=False)
    out = tmp_path / "out"
    check_bundle(out, base, case)
    files = m["weights"]["files"]
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert m["weights"]["index"] == "model.safetensors.index.json"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    _, stored, _ = read_bundle(out)
    assert set(index["weight_map"]) == set(stored)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    for f in files:
        part = load_file(str(out / f))
        assert all(index["weight_map"][k] == f for k in part)
        data = sum(t.numel() * t.element_size() for t in part.values())
        assert data <= limit or len(part) == 1, f
    # same tensors as the single-file bundle, and it loads
    _, single, _ = read_bundle(bundle_of(case))
    assert all(bits(single[k]) == bits(stored[k]) for k in single)
    model = load_pruned_model(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], stored[k]) for k in stored)


# ============================================================================ edge ratios


def test_ratio_zero_is_an_unpruned_copy(make_base_dir, tmp_path, family_case):
    base = make_base_dir(family_case)
    m = prune(base, tmp_path / "out", 0.0, show_progress=False)
    check_bundle(tmp_path / "out", base, family_case)
    assert (tmp_path / "out" / "kept_indices.safetensors").is_file()
    assert load_file(str(tmp_path / "out" / "kept_indices.safetensors")) == {}
    assert m["pruning"]["pruned_layers"] == []
    assert not any(d["pruned"] for d in m["architecture"]["layers"])
    assert m["parameters"]["pruned"] == m["parameters"]["original"]
    base_w, (_, stored, _) = read_base(base), read_bundle(tmp_path / "out")
    assert all(bits(stored[k]) == bits(base_w[k]) for k in base_w)


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2", "mistral"])
def test_low_ratio_keeps_all_kv_groups_and_writes_no_attention_maps(make_base_dir, tmp_path, case):
    base = make_base_dir(case)
    s = expected_shapes(case)
    ratio = 0.2  # floor(H_kv * 0.2) == 0 for H_kv <= 4
    assert s["num_key_value_heads"] * ratio < 1
    m = prune(base, tmp_path / "out", ratio, show_progress=False)
    check_bundle(tmp_path / "out", base, case)
    maps = load_file(str(tmp_path / "out" / "kept_indices.safetensors"))
    assert maps and not [k for k in maps if ".self_attn." in k]
    assert all(".mlp." in k for k in maps)
    for i in m["pruning"]["pruned_layers"]:
        d = m["architecture"]["layers"][i]
        assert d["num_key_value_heads"]["kept"] == s["num_key_value_heads"]
        assert d["intermediate_size"]["kept"] < s["intermediate_size"]


# ============================================================================ tied checkpoints


def test_tied_checkpoint_holding_lm_head_is_fingerprinted_without_it(tmp_path):
    """Spec 3.2: base.tensors is what save_pretrained writes: a tied lm_head.weight is absent,
    even when the checkpoint file carries a copy (as some published checkpoints do)."""
    from loramkit.model.loader import load_pruned_model

    base = tmp_path / "base"
    tiny_model("llama_tied").save_pretrained(base, safe_serialization=True)
    tiny_tokenizer(base)
    sd = load_file(str(base / "model.safetensors"))
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    m = prune(base, tmp_path / "out", 0.5, show_progress=False)
    assert "lm_head.weight" not in m["base"]["tensors"]
    _, stored, _ = read_bundle(tmp_path / "out")
    assert "lm_head.weight" not in stored
    assert m["parameters"]["original"] == sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")
    model = load_pruned_model(tmp_path / "out")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_legacy_inv_freq_in_checkpoint_is_not_part_of_the_bundle(tmp_path):
    """Spec 3.2: tensors transformers discards on load (legacy rotary_emb.inv_freq) are absent."""
    from loramkit.model.loader import load_pruned_model

    base = tmp_path / "base"
    tiny_model("llama_mha").save_pretrained(base, safe_serialization=True)
    sd = load_file(str(base / "model.safetensors"))
    n_params = sum(t.numel() for t in sd.values())
    for i in range(8):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    m = prune(base, tmp_path / "out", 0.5, show_progress=False)
    assert not [k for k in m["base"]["tensors"] if "inv_freq" in k]
    assert m["base"]["num_parameters"] == n_params
    load_pruned_model(tmp_path / "out")


# ============================================================================ blockwise scores


@pytest.mark.parametrize("threads", [1, 2])
def test_blockwise_unit_sums_are_the_same_bits(threads):
    """Squaring and summing a few units at a time (what prune does) gives exactly the sums of the
    whole-tensor way, for one unit, two, an odd count and many, along rows and columns, and never
    writes into the weight (a float32 weight's .float() is itself)."""
    from loramkit.prune.importance import unit_sums

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    try:
        for shape, dim, units in [((1024, 512), 0, 1024), ((512, 1024), 1, 1024), ((1024, 512), 0, 4), ((512, 1024), 1, 4),
                                  ((1536, 64), 0, 3), ((64, 1536), 1, 2), ((1024, 1024), 0, 1), ((300,), 0, 3)]:  # fmt: skip
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
                kept = w.clone()
                whole = unit_sums(w.float().square(), dim, units)
                assert torch.equal(unit_sums(w, dim, units, pruner_mod._square), whole), (shape, dim, units, dtype)
                assert torch.equal(w, kept)
        assert torch.get_num_threads() == threads  # unit_sums puts the thread count back
    finally:
        torch.set_num_threads(before)


# ============================================================================ staged output


def _fail_after(monkeypatch, n: int, watch: Path | None = None) -> list:
    """Make the pruner's slicing raise on call n+1; record what ``watch`` held at that moment."""
    calls: list = [0, None]
    real = pruner_mod._slice_into  # slices into the scratch buffer

    def failing(*a, **kw):
        calls[0] += 1
        if calls[0] > n:
            if watch is not None:
                calls[1] = {p.relative_to(watch).as_posix() for p in watch.rglob("*")}
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(pruner_mod, "_slice_into", failing)
    return calls


def test_failure_midway_leaves_nothing(make_base_dir, tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    parent.mkdir()
    calls = _fail_after(monkeypatch, 20, watch=parent)
    with pytest.raises(RuntimeError, match="injected"):
        prune(make_base_dir("llama_gqa"), parent / "out", 0.5, show_progress=False)
    assert calls[0] == 21  # it really failed midway, after writing tensors...
    staged = calls[1]
    assert "out" not in staged  # ...into a staging dir, never into OUT
    assert any(p.startswith(".out.tmp-") and p.endswith("model.safetensors") for p in staged), staged
    assert os.listdir(parent) == []  # no OUT, no temp dirs


def test_failure_midway_keeps_existing_output_on_overwrite(make_base_dir, bundle_of, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(bundle_of("llama_mha"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_after(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="injected"):
        prune(make_base_dir("llama_gqa"), out, 0.5, overwrite=True, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["out"]


def test_existing_output_refused_without_overwrite(make_base_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        prune(make_base_dir("llama_gqa"), out, 0.5, show_progress=False)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["out"]
    # with overwrite it is replaced by the bundle, and nothing else is left behind
    m = prune(make_base_dir("llama_gqa"), out, 0.5, overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists() and json.loads((out / "loram.json").read_text()) == m
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_of_a_file_leaves_nothing_behind(make_base_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a bundle")
    prune(make_base_dir("llama_gqa"), out, 0.5, overwrite=True, show_progress=False)
    assert (out / "loram.json").is_file()
    assert os.listdir(tmp_path) == ["out"]


def test_existing_output_refused_before_taylor_work(make_base_dir, tmp_path, monkeypatch):
    """Refusing an existing OUT must not come after minutes (hours, at 70B) of gradient work."""
    out = tmp_path / "out"
    out.mkdir()
    calib, _ = _calibration(tmp_path, 3)

    def boom(*a, **kw):
        raise AssertionError("taylor scoring ran before the output check")

    monkeypatch.setattr(pruner_mod, "calibrated_scores", boom)
    with pytest.raises(OutputExistsError):
        prune(make_base_dir("llama_gqa"), out, 0.5, importance="taylor", calibration=calib, show_progress=False)
