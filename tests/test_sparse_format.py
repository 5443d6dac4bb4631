"""The sparse-weight format (specs/bundle-v1.md 7.3, format 1.2): layout round trips, layout
checks, and what ``validate``, the readers and ``quantize`` say of a sparse bundle and of each
way to break one.

Sparse bundles here are written by ``prune --strategy unstructured|semi-structured`` with
magnitude importance (kept values are the base's, bit for bit); the pruning math itself is
tested in test_sparse_prune.py.
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramkit import Bundle, cli
from loramkit.bundle import manifest as manifest_mod
from loramkit.bundle import sparse
from loramkit.bundle.manifest import bundle_id
from loramkit.bundle.validate import validate
from loramkit.bundle.writer import finalize
from loramkit.errors import BundleError, LoramError

CASE = "llama_gqa"  # hidden 64, intermediate 172 (down_proj: 172 columns = 21.5 bytes: 4 padding bits per row)
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------- layout round trips


def _random_mask(gen: torch.Generator, shape: tuple[int, int]) -> torch.Tensor:
    """A mask of a random density, sometimes all kept or all pruned."""
    density = float(torch.rand((), generator=gen))
    density = {0: 0.0, 1: 1.0}.get(int(torch.randint(0, 6, (), generator=gen)), density)
    return torch.rand(shape, generator=gen) < density


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so equality is bitwise (a -0.0 is not a +0.0)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


SHAPES_SEEDS = range(40)


@pytest.mark.parametrize("seed", SHAPES_SEEDS)
def test_pack_unpack_round_trip(seed):
    """unpack(pack(m)) == m for any shape (columns % 8 != 0 included); the packed bytes follow
    the spec's bit order, padding is zero, and popcount is the per-row kept count."""
    gen = torch.Generator().manual_seed(seed)
    out, cols = int(torch.randint(1, 40, (), generator=gen)), int(torch.randint(1, 70, (), generator=gen))
    mask = _random_mask(gen, (out, cols))
    packed = sparse.pack_mask(mask)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (out, math.ceil(cols / 8))
    assert torch.equal(sparse.unpack_mask(packed, cols), mask)
    assert torch.equal(sparse.popcount(packed), mask.sum(dim=1))
    # the spec's definition, bit by bit: row r, byte j, bit k (value 1 << k) = mask[r, 8j + k]
    want = torch.zeros_like(packed, dtype=torch.int64)
    for r, c in mask.nonzero().tolist():
        want[r, c // 8] |= 1 << (c % 8)
    assert torch.equal(packed.long(), want)
    assert sparse.layout_problems("m", (out, cols), packed, int(mask.sum()), None) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", range(12))
def test_compress_expand_round_trip(seed, dtype):
    """expand(compress(W, m)) is W where m keeps and exactly 0 elsewhere, bit for bit; values are
    the kept weights in row-major order, in W's dtype; a kept weight may itself be 0."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out, cols = int(torch.randint(1, 33, (), generator=gen)), int(torch.randint(1, 90, (), generator=gen))
    weight = torch.randn(out, cols, generator=gen).to(dtype)
    weight[0, 0] = 0.0  # kept or not, the mask (not the value) says what was pruned
    mask = _random_mask(gen, (out, cols))
    packed, values = sparse.compress(weight, mask)
    assert values.dtype == dtype and values.shape == (int(mask.sum()),)
    assert torch.equal(values, torch.tensor([weight[r, c].item() for r, c in mask.nonzero().tolist()], dtype=dtype))
    dense = sparse.expand(packed, values, (out, cols))
    assert dense.dtype == dtype
    assert torch.equal(_bits(dense), _bits(torch.where(mask, weight, torch.zeros((), dtype=dtype))))  # +0.0, never -0.0
    assert torch.equal(sparse.compress(dense, mask)[1], values)  # and back


def test_stored_bytes_of_half_sparse_16_bit_module():
    """Informative figure of 7.3: 50% kept in 16 bits = 1/8 (mask) + 1/2 (values) = 56.25% of dense."""
    shape = (4096, 4096)
    nnz = shape[0] * shape[1] // 2
    assert Fraction(sparse.stored_bytes(shape, nnz, 2), shape[0] * shape[1] * 2) == Fraction(9, 16)
    # with padding: 172 columns take 22 bytes per row, not 21.5
    assert sparse.stored_bytes((3, 172), 10, 2) == 3 * 22 + 20


# ---------------------------------------------------------------------------- layout checks


def _semi_mask(gen: torch.Generator, out: int, cols: int, n: int, m: int) -> torch.Tensor:
    """A random N:M mask: n kept of every m consecutive columns of each row."""
    scores = torch.rand(out, cols // m, m, generator=gen)  # (out, groups, m)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, dim=-1).indices, True)
    return keep.view(out, cols)


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_layout_problems_nm(pattern):
    n, m = pattern
    gen = torch.Generator().manual_seed(7)
    mask = _semi_mask(gen, 6, 24, n, m)
    packed = sparse.pack_mask(mask)
    nnz = int(mask.sum())
    assert nnz == 6 * 24 // m * n
    assert sparse.layout_problems("mod", (6, 24), packed, nnz, pattern) == []
    # move one kept weight into the next group of the same row: same count, N:M broken twice
    broken = mask.clone()
    col = int(broken[3, :m].nonzero()[0])
    free = int((~broken[3, m : 2 * m]).nonzero()[0]) + m
    broken[3, col], broken[3, free] = False, True
    problems = sparse.layout_problems("mod", (6, 24), sparse.pack_mask(broken), nnz, pattern)
    assert len(problems) == 1 and f"row 3, columns 0..{m - 1} keep {n - 1}, the {n}:{m} pattern keeps {n}" in problems[0]
    # columns not a multiple of M
    odd = sparse.pack_mask(torch.ones(2, m + 1, dtype=torch.bool))
    assert "not a multiple of M" in sparse.layout_problems("mod", (2, m + 1), odd, 2 * (m + 1), pattern)[0]


def test_layout_problems_counts_padding_and_shape():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 13, generator=gen) < 0.5  # 13 columns: 3 padding bits per row
    packed = sparse.pack_mask(mask)
    nnz = int(mask.sum())
    assert sparse.layout_problems("w", (5, 13), packed, nnz, None) == []
    assert sparse.layout_problems("w", (5, 13), packed, nnz + 1, None) == [
        f"w.weight.values: {nnz + 1} values, the mask keeps {nnz}"
    ]
    for bit in (5, 6, 7):  # columns 13, 14, 15 do not exist
        padded = packed.clone()
        padded[2, 1] |= 1 << bit
        problems = sparse.layout_problems("w", (5, 13), padded, nnz + 1, None)
        assert problems[0] == "w.weight.mask: bits set beyond column 13 (padding must be 0)", problems
    assert "expected uint8 [5, 2]" in sparse.layout_problems("w", (5, 13), packed[:, :1], nnz, None)[0]
    assert "expected uint8 [5, 2]" in sparse.layout_problems("w", (5, 13), packed.to(torch.int16), nnz, None)[0]
    assert sparse.layout_problems("w", (5, 16), sparse.pack_mask(torch.ones(5, 16, dtype=torch.bool)), 80, None) == []


# ---------------------------------------------------------------------------- a sparse bundle


_CACHE: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def make_sparse(make_base_dir, tmp_path_factory):
    """``make_sparse(case, pattern=None)``: a sparse bundle built once. READ-ONLY: copy it."""
    from loramkit.prune.pruner import prune

    def _make(case: str = CASE, pattern: str | None = None) -> Path:
        key = (case, pattern)
        if key not in _CACHE:
            out = tmp_path_factory.mktemp(f"sparse_{case}") / "bundle"
            strategy = dict(strategy="semi-structured", pattern=pattern) if pattern else dict(strategy="unstructured")
            prune(
                make_base_dir(case, dtype=DTYPE),
                out,
                None if pattern else 0.5,
                importance="magnitude",
                show_progress=False,
                **strategy,
            )
            _CACHE[key] = out
        return _CACHE[key]

    return _make


@pytest.fixture
def copy_sparse(make_sparse, tmp_path):
    def _copy(case: str = CASE, pattern: str | None = None) -> Path:
        return Path(shutil.copytree(make_sparse(case, pattern), tmp_path / "bundle"))

    return _copy


def read_manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "loram.json").read_text(encoding="utf-8"))


def edit_manifest(d: Path, fn, *, resign: bool = True) -> None:
    m = read_manifest(d)
    fn(m)
    if resign:
        m["bundle_id"] = bundle_id(m)
    (d / "loram.json").write_text(json.dumps(m, indent=2), encoding="utf-8")


def edit_tensors(d: Path, fn) -> None:
    """Change the stored tensors and re-finalize (hashes and id consistent: only content checks can tell)."""
    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    finalize(d, read_manifest(d))


@pytest.mark.parametrize("case, pattern", [(CASE, None), (CASE, "2:4"), ("phi3", None), ("qwen2", "2:4")])
def test_sparse_bundle_is_sound(make_sparse, make_base_dir, case, pattern):
    """A sparse bundle validates clean; its counts and bytes are what 3.5 and 7.3 say; the values
    are the base's at the kept positions (magnitude, not aligned) and the expanded weight is the
    base with zeros at the pruned ones."""
    d = make_sparse(case, pattern)
    assert validate(d) == ([], [])
    b = Bundle(d)
    m = b.manifest
    assert m["format_version"] == "1.2.0" and m["requires"] == ["sparse"]
    assert b.sparsity == m["sparsity"] and b.sparse_modules == set(m["sparsity"]["modules"])
    assert len(b.sparse_modules) == len(m["pruning"]["pruned_layers"]) * len(b.arch.family.projections(0))
    assert all(not d_["pruned"] for d_ in m["architecture"]["layers"])
    base = load_file(make_base_dir(case, dtype=DTYPE) / "model.safetensors")
    stored = load_file(d / "model.safetensors")
    assert set(stored) == (set(base) - {f"{mod}.weight" for mod in b.sparse_modules}) | {
        k for mod in b.sparse_modules for k in (sparse.mask_key(mod), sparse.values_key(mod))
    }
    nnz = 0
    for mod in sorted(b.sparse_modules):
        w = base[f"{mod}.weight"]
        packed, values = stored[sparse.mask_key(mod)], stored[sparse.values_key(mod)]
        mask = sparse.unpack_mask(packed, w.shape[1])
        assert torch.equal(values.view(torch.int16), w[mask].view(torch.int16))  # bit for bit
        assert torch.equal(sparse.expand(packed, values, tuple(w.shape)), torch.where(mask, w, 0))
        nnz += values.numel()
        if pattern is None:
            assert w.numel() - values.numel() == math.floor(w.numel() * Fraction(1, 2))
        else:
            assert sparse.layout_problems(mod, tuple(w.shape), packed, values.numel(), (2, 4)) == []
    dense = sum(t.numel() for k, t in base.items() if k.rsplit(".", 1)[0] not in b.sparse_modules or not k.endswith(".weight"))
    assert m["parameters"] == {"original": sum(t.numel() for t in base.values()), "pruned": dense + nnz}


@pytest.mark.parametrize("importance", ["wanda", "sparsegpt"])
def test_calibrated_bundles_validate_without_warnings(make_base_dir, tmp_path, importance):
    """Wanda and SparseGPT bundles (sparsegpt updates the kept values) are sound, and their
    per-module removed counts fall within floor rounding of the ratio: no warning."""
    from loramkit.prune.pruner import prune
    from tests.factory import sample_texts

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(sample_texts(16, seed=3)) + "\n", encoding="utf-8")
    prune(make_base_dir(CASE, dtype=DTYPE), tmp_path / "b", 0.55, strategy="unstructured", importance=importance,
          calibration=calib, calibration_samples=4, calibration_seq_len=32, show_progress=False)  # fmt: skip
    assert validate(tmp_path / "b") == ([], [])


def test_bytes_of_a_half_sparse_bf16_module(make_sparse):
    """Measured on disk: a 50% bf16 module takes 56.25% of its dense bytes (in % 8 == 0)."""
    d = make_sparse()
    stored = load_file(d / "model.safetensors")
    mod = "model.layers.3.self_attn.q_proj"  # [256, 64]
    packed, values = stored[sparse.mask_key(mod)], stored[sparse.values_key(mod)]
    real = packed.numel() * packed.element_size() + values.numel() * values.element_size()
    assert real == sparse.stored_bytes((256, 64), values.numel(), 2)
    assert Fraction(real, 256 * 64 * 2) == Fraction(9, 16)


def test_old_manifest_without_sparsity_reads_as_dense(make_base_dir, tmp_path):
    """A 1.1 manifest (no `sparsity` key) is read as is: absent == null."""
    from loramkit.prune.pruner import prune

    d = tmp_path / "b"
    prune(make_base_dir(CASE, dtype=DTYPE), d, 0.5, importance="magnitude", show_progress=False)

    def to_1_1(m):
        del m["sparsity"]
        m["format_version"] = "1.1.0"

    edit_manifest(d, to_1_1)
    assert validate(d) == ([], [])
    b = Bundle(d)
    assert b.manifest["format_version"] == "1.1.0" and b.sparsity is None and b.sparse_modules == set()


# ---------------------------------------------------------------------------- refusals


def _problems(d: Path) -> list[str]:
    problems, _ = validate(d)
    assert problems, "validate found nothing"
    return problems


def _cli_unsound(capsys, d: Path, needle: str) -> None:
    """`loramkit validate` exits 1, one line per problem, no traceback, naming ``needle``."""
    rc = cli.run(["validate", str(d)])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err, (out, err)
    assert needle in err, err


def _sparse_module(d: Path, gen: torch.Generator, cols_mod: int | None = None) -> str:
    """A random sparse module of the bundle (whose column count is not a multiple of 8 when asked)."""
    m = read_manifest(d)
    mods = sorted(m["sparsity"]["modules"])
    if cols_mod is not None:
        shapes = m["base"]["tensors"]
        mods = [x for x in mods if shapes[f"{x}.weight"]["shape"][1] % 8 == cols_mod]
    return mods[int(torch.randint(0, len(mods), (), generator=gen))]


FUZZ_SEEDS = range(3)


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_refuses_wrong_bit_count(copy_sparse, capsys, seed):
    """A mask bit flipped (kept count off by one) against the stored values."""
    d = copy_sparse()
    gen = torch.Generator().manual_seed(seed)
    mod = _sparse_module(d, gen)

    def flip(t):
        packed = t[sparse.mask_key(mod)]
        r, j, k = (int(torch.randint(0, n, (), generator=gen)) for n in (packed.shape[0], packed.shape[1], 8))
        k = k if 8 * j + k < read_manifest(d)["base"]["tensors"][f"{mod}.weight"]["shape"][1] else 0
        packed[r, j] ^= 1 << k

    edit_tensors(d, flip)
    problems = _problems(d)
    assert any(p.startswith(f"{sparse.values_key(mod)}: ") and "the mask keeps" in p for p in problems), problems
    _cli_unsound(capsys, d, "the mask keeps")


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_refuses_padding_bits(copy_sparse, seed):
    d = copy_sparse()
    gen = torch.Generator().manual_seed(seed)
    mod = _sparse_module(d, gen, cols_mod=4)  # down_proj: 172 columns, bits 4..7 of the last byte are padding
    row, bit = int(torch.randint(0, 64, (), generator=gen)), int(torch.randint(4, 8, (), generator=gen))
    edit_tensors(d, lambda t: t[sparse.mask_key(mod)][row, -1].bitwise_or_(1 << bit))
    assert f"{sparse.mask_key(mod)}: bits set beyond column 172 (padding must be 0)" in _problems(d)


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_refuses_nm_violation(copy_sparse, seed):
    """One kept weight moved to the neighbouring group of its row: same count, 2:4 broken."""
    d = copy_sparse(pattern="2:4")
    gen = torch.Generator().manual_seed(seed)
    mod = _sparse_module(d, gen)
    cols = read_manifest(d)["base"]["tensors"][f"{mod}.weight"]["shape"][1]

    def move(t):
        mask = sparse.unpack_mask(t[sparse.mask_key(mod)], cols)
        r, g = int(torch.randint(0, mask.shape[0], (), generator=gen)), int(torch.randint(0, cols // 4 - 1, (), generator=gen))
        src = 4 * g + int(mask[r, 4 * g : 4 * g + 4].nonzero()[0])
        dst = 4 * g + 4 + int((~mask[r, 4 * g + 4 : 4 * g + 8]).nonzero()[0])
        mask[r, src], mask[r, dst] = False, True
        t[sparse.mask_key(mod)] = sparse.pack_mask(mask)

    edit_tensors(d, move)
    problems = _problems(d)
    assert (
        len(problems) == 1
        and problems[0].startswith(f"{sparse.mask_key(mod)}: row ")
        and "the 2:4 pattern keeps 2" in problems[0]
    )


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_refuses_truncated_values(copy_sparse, capsys, seed):
    d = copy_sparse()
    gen = torch.Generator().manual_seed(seed)
    mod = _sparse_module(d, gen)
    cut = int(torch.randint(1, 5, (), generator=gen))
    edit_tensors(d, lambda t: t.__setitem__(sparse.values_key(mod), t[sparse.values_key(mod)][:-cut].clone()))
    problems = _problems(d)
    assert any(p.startswith(f"{sparse.values_key(mod)}: ") and "the mask keeps" in p for p in problems), problems
    assert any("parameters.pruned" in p for p in problems), problems
    _cli_unsound(capsys, d, sparse.values_key(mod))


def test_refuses_wrong_dtypes_and_names(copy_sparse):
    d = copy_sparse()
    a, b_, c = (f"model.layers.{i}.self_attn.q_proj" for i in (2, 3, 4))  # [256, 64] each

    def corrupt(t):
        t[sparse.values_key(a)] = t[sparse.values_key(a)].float()  # values not in the base dtype
        t[sparse.mask_key(b_)] = t[sparse.mask_key(b_)].to(torch.int16)  # mask not U8
        t[f"{c}.weight"] = sparse.expand(t.pop(sparse.mask_key(c)), t.pop(sparse.values_key(c)), (256, 64))  # stored dense

    edit_tensors(d, corrupt)
    problems = _problems(d)
    assert any(p.startswith(f"{sparse.values_key(a)}: stored F32[") and "expected BF16" in p for p in problems), problems
    assert any(p.startswith(f"{sparse.mask_key(b_)}: stored I16[") and "expected U8[256, 8]" in p for p in problems), problems
    assert f"weights lack {sparse.mask_key(c)}" in problems and f"weights lack {sparse.values_key(c)}" in problems
    assert any(p.startswith(f"weights hold {c}.weight, stored sparse") for p in problems), problems


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.update(requires=[]), "requires"),  # sparsity set, 'sparse' not required
        (lambda m: m.update(sparsity=None, requires=[]), "sparsity"),  # unstructured with no sparsity record
        (lambda m: m["sparsity"].update(format="csr"), "sparsity"),
        (lambda m: m["pruning"].update(strategy="block-sparse"), "strategy"),
    ],
    ids=["requires-lacks-sparse", "sparsity-null", "format-not-bitmask", "unknown-strategy"],
)
def test_manifest_rules_refused_by_every_reader(copy_sparse, capsys, edit, needle):
    d = copy_sparse()
    edit_manifest(d, edit)
    with pytest.raises(BundleError) as e:
        Bundle(d)
    assert "\n" not in str(e.value) and needle in str(e.value) and "schema" in str(e.value)
    rc = cli.run(["validate", str(d)])
    _, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1 and needle in err


def test_a_1_1_reader_refuses_by_name(make_sparse, monkeypatch, capsys):
    """A reader without the feature (1.1: KNOWN_FEATURES lacks 'sparse') refuses, naming it."""
    d = make_sparse()
    monkeypatch.setattr(manifest_mod, "KNOWN_FEATURES", frozenset({"quantization"}))
    with pytest.raises(BundleError, match=r"requires sparse, which this loramkit .* does not implement; upgrade loramkit"):
        Bundle(d)
    rc = cli.run(["inspect", str(d)])
    _, err = capsys.readouterr()
    assert rc == 1 and len(err.splitlines()) == 1 and "requires sparse" in err


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m["pruning"].update(ratio=0.6), "pruning.ratio 0.6 is not 1 - N/M = 1/2 of the 2:4 pattern"),
        (lambda m: m["sparsity"].update(pattern="4:2"), "sparsity.pattern: pattern '4:2' is not N:M"),
        (lambda m: m["sparsity"].update(pattern=None), "semi-structured pruning needs an N:M pattern"),
        (lambda m: m["pruning"].update(pruned_layers=[2, 3]), "pruning.pruned_layers is [2, 3]"),
        (lambda m: m["sparsity"].update(modules=m["sparsity"]["modules"][1:]), "sparsity.modules must be"),
        (lambda m: m["architecture"]["layers"][3].update(pruned=True), "layer 3: marked pruned"),
        (lambda m: m["pruning"].update(strategy="structured", rounding="paper"), "stores no sparse weights"),
    ],
    ids=["ratio", "pattern-n-above-m", "pattern-null", "pruned-layers", "modules", "layer-marked-pruned", "structured"],
)
def test_record_problems(copy_sparse, edit, needle):
    d = copy_sparse(pattern="2:4")
    edit_manifest(d, edit)
    problems = _problems(d)
    assert any(needle in p for p in problems), problems


def test_unstructured_ratio_off_is_a_warning(copy_sparse):
    d = copy_sparse()
    edit_manifest(d, lambda m: m["pruning"].update(ratio=0.4))
    problems, warnings = validate(d)
    assert problems == [] and warnings and all("pruning.ratio 0.4 with magnitude groups" in w for w in warnings)
    assert len(warnings) == len(read_manifest(d)["sparsity"]["modules"])


def test_unstructured_count_is_checked_exactly(copy_sparse):
    """Ratio 0.5001 removes one weight more per module than 0.5 under the magnitude rule: within
    floor rounding of the ratio (the bound alone would pass it), but not the pruner's count."""
    d = copy_sparse()
    edit_manifest(d, lambda m: m["pruning"].update(ratio=0.5001))
    problems, warnings = validate(d)
    m = read_manifest(d)
    shapes = {mod: m["base"]["tensors"][f"{mod}.weight"]["shape"] for mod in m["sparsity"]["modules"]}
    off = sorted(mod for mod, (o, i) in shapes.items() if math.floor(o * i * Fraction("0.5001")) != o * i // 2)
    assert problems == [] and off and len(off) < len(shapes)  # the case separates the two checks
    assert sorted(w.split(":")[0] for w in warnings) == off
    assert all("with magnitude groups and floor rounding removes" in w for w in warnings), warnings
    # an importance this loramkit does not know keeps the bound: one warning, for the name
    edit_manifest(d, lambda m: m["pruning"].update(importance="obs"))
    assert validate(d) == ([], ["pruning.importance 'obs' is unknown to this loramkit for unstructured pruning"])


def test_quantization_with_sparsity_is_a_problem(copy_sparse):
    d = copy_sparse()

    def add_q(m):
        m["requires"] = ["quantization", "sparse"]
        m["quantization"] = {
            "method": "bitsandbytes", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
            "compute_dtype": "bfloat16", "quant_storage": "uint8", "modules": m["sparsity"]["modules"][:1], "unquantized": "",
        }  # fmt: skip

    edit_manifest(d, add_q)
    assert any("quantization of a sparse bundle" in p for p in _problems(d))


def test_quantize_refuses_a_sparse_bundle(make_sparse, tmp_path, capsys):
    """7.1: quantize of a sparse bundle is refused in one line, before anything is written."""
    from loramkit.quant import quantize_bundle

    d = make_sparse()
    out = tmp_path / "q"
    with pytest.raises(LoramError) as e:
        quantize_bundle(d, out, show_progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("quantize does not support sparse bundles") and "unstructured 0.5" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc = cli.run(["quantize", str(d), "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 1 and err.splitlines() == [f"error: {msg}"] and not out.exists()


# ---------------------------------------------------------------------------- inspect


def test_inspect_shows_sparsity_and_real_bytes(make_sparse, capsys):
    """inspect --json carries per module what the text shows per layer: kept weights, mask +
    values bytes (the stored tensors' own sizes) against the dense weight's bytes."""
    d = make_sparse(pattern="2:4")
    assert cli.run(["inspect", str(d), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["sparsity"] == read_manifest(d)["sparsity"] and s["pruning"]["strategy"] == "semi-structured"
    stored = load_file(d / "model.safetensors")
    rows = {r["module"]: r for r in s["sparse_modules"]}
    assert set(rows) == set(s["sparsity"]["modules"])
    for mod, r in rows.items():
        packed, values = stored[sparse.mask_key(mod)], stored[sparse.values_key(mod)]
        out, cols = r["shape"]
        assert r["kept"] == values.numel() == out * cols // 2 and r["total"] == out * cols and r["sparsity"] == 0.5
        assert r["bytes"] == packed.numel() + 2 * values.numel() and r["dense_bytes"] == 2 * out * cols
    assert cli.run(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    assert "semi-structured 2:4, magnitude" in text and "LoRAM-Semi" in text
    real, dense = sum(r["bytes"] for r in rows.values()), sum(r["dense_bytes"] for r in rows.values())
    total = next(line for line in text.splitlines() if line.strip("│ ").startswith("total"))
    assert f"{sum(r['kept'] for r in rows.values()):,} / {sum(r['total'] for r in rows.values()):,}" in total
    assert f"{real / dense:.2%}" in total
