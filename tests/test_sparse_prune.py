"""Non-structured pruning (LoRAM-Unst, LoRAM-Semi): the math, the sequential engine and the sparse bundles.

References are independent of the package's code paths:
- SparseGPT: a plain column-by-column optimal-brain-surgeon loop in float64 that inverts the
  Hessian of the not yet processed columns at every step (no Cholesky factor, no blocks of
  lazy updates), against :func:`loramkit.prune.sparse.sparsegpt` (Cholesky, blocks of 128);
- Wanda and magnitude: a full stable argsort of the scores per comparison group;
- sequential semantics: the whole transformers model in float64, each layer's statistics
  gathered by a forward of the whole model whose earlier layers are already pruned;
- bundles: the base read with the safetensors library, the stored tensors unpacked here.
"""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loramkit.bundle import sparse as layout
from loramkit.cli import run
from loramkit.families import ArchSpec
from loramkit.families.pruning_rules import exact_ratio
from loramkit.prune import sparse
from loramkit.prune.calibration import EngineSettings, load_calibration, sequential_prune
from loramkit.prune.pruner import prune
from tests.factory import make_base, sample_texts
from tests.test_calibration import _one_line_error
from tests.test_prune import raw_sha256, read_base
from tests.tolerance import assert_close_eps

F64 = EngineSettings(micro_batch=2, dtype=torch.float64, show_progress=False)
SAMPLES, SEQ_LEN = 5, 24  # micro-batches of 2: 2 + 2 + 1 rows


# ============================================================================ references


def obs_reference(
    W: torch.Tensor, H: torch.Tensor, ratio: Fraction, pattern: tuple[int, int] | None, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT by its definition, float64: column j's saliency and update use inv(H[j:, j:]).

    Removing w_qj with the columns before j fixed is the OBS step on the remaining columns:
    delta = -(w_qj - kept) / [Hinv]_00 * Hinv[0, :], Hinv = inv(H[j:, j:]); the saliency of a
    weight is w^2 / [Hinv]_00. Unstructured masks are chosen at the start of each block of
    ``blocksize`` columns (floor(rows * cols * ratio) lowest, ties to the lower row-major index),
    N:M masks at the start of each group of M columns (on the weights updated so far).
    """
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(cols, dtype=torch.float64) * (0.01 * torch.diag(H).mean())
    inv00 = torch.tensor([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(cols)], dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if pattern is None and j % blocksize == 0:
            e = min(j + blocksize, cols)
            score = (W[:, j:e] ** 2 / inv00[j:e]).reshape(-1)  # row-major over the block
            removed = torch.argsort(score, stable=True)[: math.floor(score.numel() * ratio)]
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[removed] = False
            keep[:, j:e] = block.view(rows, e - j)
        if pattern is not None and j % pattern[1] == 0:
            n, m = pattern
            score = W[:, j : j + m] ** 2 / inv00[j : j + m]
            removed = torch.argsort(score, dim=1, stable=True)[:, : m - n]
            keep[:, j : j + m] = torch.ones(rows, m, dtype=torch.bool).scatter_(1, removed, False)
        Hinv = torch.linalg.inv(H[j:, j:])  # the columns not yet processed
        w = W[:, j].clone()
        q = torch.where(keep[:, j], w, torch.zeros_like(w))
        W[:, j:] -= ((w - q) / Hinv[0, 0]).unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, j] = q
    return keep, W


def lowest_by_argsort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool (G, S): per row the first k of a stable ascending argsort (ties: lower index first)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    out.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return out


def nm_by_argsort(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    return lowest_by_argsort(scores.reshape(-1, m), m - n).view(rows, cols)


def damped_condition(H: torch.Tensor) -> float:
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += torch.eye(H.shape[0], dtype=torch.float64) * (0.01 * torch.diag(H).mean())
    return float(torch.linalg.cond(H))


def problem(seed: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of inputs with uneven feature scales and one dead input (column 3)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    X = torch.randn(3 * cols, cols, generator=g, dtype=torch.float64) * torch.rand(cols, generator=g, dtype=torch.float64)
    X[:, 3] = 0
    return W, sparse.hessian(X.T @ X, X.shape[0])


# ============================================================================ the math


@pytest.mark.parametrize(
    "seed, rows, cols, ratio, pattern",
    [
        (0, 12, 40, Fraction(1, 2), None),  # one block
        (1, 16, 200, Fraction(3, 5), None),  # a full block of 128 and a partial one: lazy updates across blocks
        (2, 8, 136, Fraction(1, 2), (2, 4)),  # 2:4, blocks of 128 + 8
        (3, 8, 132, Fraction(2, 3), (1, 3)),  # 1:3: blocks of 126 (whole groups) + 6
    ],
)
def test_sparsegpt_equals_the_dense_obs_reference(seed, rows, cols, ratio, pattern):
    """Same masks, and the same updated weights within the rounding the Hessian's conditioning allows."""
    W, H = problem(seed, rows, cols)
    want_keep, want = obs_reference(W, H, ratio, pattern, sparse.sparsegpt_blocksize(pattern))
    cond = damped_condition(H)  # solving with H loses up to cond(H) units of roundoff
    for dtype in (torch.float64, torch.float32):
        keep, got = sparse.sparsegpt(W.to(dtype), H.to(dtype), ratio, pattern, dtype=dtype)
        assert got.dtype == dtype
        assert torch.equal(keep, want_keep), f"{dtype}: {(keep != want_keep).sum()} mask entries differ"
        assert_close_eps(got.double(), want, cond, dtype, msg=f"{dtype}")
        assert not got[~keep].any() and not keep[:, 3].any(), "removed weights and the dead input are zero"
        assert int(keep.sum()) == sparse.kept_count("sparsegpt", (rows, cols), ratio, pattern)


def test_sparsegpt_rounds_once_to_the_base_dtype():
    """A bf16 weight: the math in fp32, the result rounded to bf16 once (kept values may move: OBS updates)."""
    W, H = problem(4, 8, 64)
    keep, got = sparse.sparsegpt(W.to(torch.bfloat16), H.float(), Fraction(1, 2))
    keep32, got32 = sparse.sparsegpt(W.to(torch.bfloat16).float(), H.float(), Fraction(1, 2))
    assert got.dtype == torch.bfloat16 and torch.equal(keep, keep32)
    assert torch.equal(got, got32.to(torch.bfloat16))


@pytest.mark.parametrize("seed", range(6))
def test_wanda_masks_equal_a_direct_argsort(seed):
    """Per output row the floor(in * ratio) lowest |W_ij| * ||X_j||, ties (planted: integer weights) to the lower index."""
    g = torch.Generator().manual_seed(100 + seed)
    rows, cols = int(torch.randint(1, 20, (), generator=g)), 4 * int(torch.randint(1, 30, (), generator=g))
    W = torch.randint(-3, 4, (rows, cols), generator=g).float()  # few values: many ties
    sq = torch.rand(cols, generator=g) * torch.randint(0, 3, (cols,), generator=g)  # some features never active
    score = W.abs() * sq.sqrt()
    for ratio in (Fraction(1, 2), Fraction(3, 10), Fraction(9, 10)):
        want = ~lowest_by_argsort(score, math.floor(cols * ratio))
        assert torch.equal(sparse.wanda_mask(W, sq, ratio), want)
    for n, m in ((2, 4), (1, 4), (3, 4)):
        assert torch.equal(sparse.wanda_mask(W, sq, Fraction(m - n, m), (n, m)), ~nm_by_argsort(score, n, m))


@pytest.mark.parametrize("seed", range(6))
def test_magnitude_masks_equal_a_direct_argsort(seed):
    """The floor(out * in * ratio) lowest |W| over the whole matrix (bf16: ties abound), N:M per row."""
    g = torch.Generator().manual_seed(200 + seed)
    rows, cols = int(torch.randint(1, 40, (), generator=g)), 4 * int(torch.randint(1, 40, (), generator=g))
    W = (torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16)
    score = W.float().abs()
    for ratio in (Fraction(1, 2), Fraction(11, 20), Fraction(1, 7)):
        want = ~lowest_by_argsort(score.view(1, -1), math.floor(W.numel() * ratio)).view(rows, cols)
        assert torch.equal(sparse.magnitude_mask(W, ratio), want)
    assert torch.equal(sparse.magnitude_mask(W, Fraction(1, 2), (2, 4)), ~nm_by_argsort(score, 2, 4))


@pytest.mark.parametrize("seed", range(8))
def test_patterns_hold_on_random_shapes(seed):
    """Property: each comparison group removes exactly floor(size * ratio) (N:M: keeps exactly N of each M),
    every removed score is at most every kept score of its group, and kept_count predicts the total."""
    g = torch.Generator().manual_seed(300 + seed)
    m = int(torch.randint(2, 9, (), generator=g))
    n = int(torch.randint(1, m, (), generator=g))
    rows = int(torch.randint(1, 24, (), generator=g))
    cols = m * int(torch.randint(1, 40, (), generator=g))
    ratio = Fraction(int(torch.randint(0, 20, (), generator=g)), 20)
    W = torch.randn(rows, cols, generator=g)
    sq = torch.rand(cols, generator=g)
    X = torch.randn(2 * cols, cols, generator=g)
    h = sparse.hessian(X.T @ X, X.shape[0])
    cases = {
        "magnitude": (sparse.magnitude_mask(W, ratio), W.abs(), [(slice(None), slice(None))]),
        "wanda": (sparse.wanda_mask(W, sq, ratio), W.abs() * sq.sqrt(), [(r, slice(None)) for r in range(rows)]),
    }
    for importance, (keep, score, groups) in cases.items():
        assert int(keep.sum()) == sparse.kept_count(importance, (rows, cols), ratio, None), importance
        for gr in groups:
            k, s = keep[gr], score[gr]
            assert int((~k).sum()) == math.floor(k.numel() * ratio), importance
            if k.any() and (~k).any():
                assert float(s[~k].max()) <= float(s[k].min()), importance
    keep_gpt, _ = sparse.sparsegpt(W, h, ratio)
    assert int(keep_gpt.sum()) == sparse.kept_count("sparsegpt", (rows, cols), ratio, None)
    for b in range(0, cols, 128):
        block = keep_gpt[:, b : b + 128]
        assert int((~block).sum()) == math.floor(block.numel() * ratio)
    for keep in (
        sparse.magnitude_mask(W, ratio, (n, m)),
        sparse.wanda_mask(W, sq, ratio, (n, m)),
        sparse.sparsegpt(W, h, ratio, (n, m))[0],
    ):
        assert torch.equal(keep.view(rows, cols // m, m).sum(-1), torch.full((rows, cols // m), n))
        assert not layout.layout_problems("w", (rows, cols), layout.pack_mask(keep), int(keep.sum()), (n, m))


# ============================================================================ bundles


def stored(bundle: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    m = json.loads((bundle / "loram.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for f in m["weights"]["files"]:
        weights |= load_file(str(bundle / f))
    return m, weights


def kept_of(weights: dict[str, torch.Tensor], module: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept bool [out, in], dense weight with zeros elsewhere), unpacked here from the stored bits (LSB first)."""
    packed = weights[layout.mask_key(module)]
    bits = (packed.unsqueeze(-1).long() >> torch.arange(8)) & 1  # (out, bytes, 8)
    keep = bits.reshape(shape[0], -1)[:, : shape[1]].bool()
    dense = torch.zeros(shape, dtype=weights[layout.values_key(module)].dtype)
    dense[keep] = weights[layout.values_key(module)]
    return keep, dense


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(as_int[a.element_size()]), b.view(as_int[b.element_size()]))
    )


def projections(arch: ArchSpec, layers: list[int]) -> list[str]:
    return [arch.family.module(i, r) for i in layers for r in ("q", "k", "v", "o", "gate", "up", "down")]


def check_sparse_bundle(bundle: Path, base: Path, strategy: str, importance: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """What every sparse bundle must be, read without the package: manifest, stored names, counts, fingerprint."""
    m, w = stored(bundle)
    cfg = json.loads((base / "config.json").read_text())
    arch = ArchSpec.from_config(cfg)
    base_w = read_base(base)
    L = arch.num_hidden_layers
    pr = m["pruning"]
    assert m["format_version"] == "1.2.0" and m["requires"] == ["sparse"]
    assert pr["strategy"] == strategy and pr["importance"] == importance and pr["rounding"] == "floor"
    assert pr["pruned_layers"] == list(range(pr["keep_first"], L - pr["keep_last"]))
    assert pr["importance_definition"] == sparse.DEFINITIONS[importance]
    modules = list(dict.fromkeys(projections(arch, pr["pruned_layers"])))  # Phi-3: fused modules once
    assert m["sparsity"]["format"] == "bitmask" and m["sparsity"]["modules"] == modules
    assert all(
        not d["pruned"] and d["intermediate_size"]["kept"] == d["intermediate_size"]["original"]
        for d in m["architecture"]["layers"]
    )
    assert load_file(str(bundle / "kept_indices.safetensors")) == {}
    sparse_names = {f"{p}.weight" for p in modules}
    want_names = {n for n in base_w if not (arch.tie_word_embeddings and n == "lm_head.weight")} - sparse_names
    want_names |= {layout.mask_key(p) for p in modules} | {layout.values_key(p) for p in modules}
    assert set(w) == want_names
    for n in set(w) & set(base_w):  # embeddings, norms, biases, intact layers: unchanged
        assert torch.equal(w[n], base_w[n]), n
    nnz = sum(w[layout.values_key(p)].numel() for p in modules)
    dense = sum(base_w[n].numel() for n in base_w if n in want_names)
    assert m["parameters"] == {"original": m["base"]["num_parameters"], "pruned": dense + nnz}
    raw = raw_sha256(base)
    assert {n: e["sha256"] for n, e in m["base"]["tensors"].items()} == {n: raw[n] for n in m["base"]["tensors"]}
    pattern = None if m["sparsity"]["pattern"] is None else layout.parse_pattern(m["sparsity"]["pattern"])
    for p in modules:
        shape = tuple(base_w[f"{p}.weight"].shape)
        nnz_p = w[layout.values_key(p)].numel()
        assert w[layout.values_key(p)].dtype == base_w[f"{p}.weight"].dtype
        assert not layout.layout_problems(p, shape, w[layout.mask_key(p)], nnz_p, pattern), p
        assert nnz_p == sparse.kept_count(importance, shape, exact_ratio(pr["ratio"]), pattern), p
    assert run(["validate", str(bundle)]) == 0
    return m, w


@pytest.mark.parametrize("strategy, extra", [("unstructured", {"ratio": 0.55}), ("semi-structured", {"pattern": "2:4"})])
def test_magnitude_bundle_every_family(make_base_dir, tmp_path, family_case, strategy, extra):
    """Masks are the argsort's lowest |W| of the base; kept values are the base's, bit for bit."""
    base = make_base_dir(family_case)
    kw = dict(extra)  # the parameters are shared by every case
    prune(base, tmp_path / "b", kw.pop("ratio", None), strategy=strategy, show_progress=False, **kw)
    m, w = check_sparse_bundle(tmp_path / "b", base, strategy, "magnitude")
    base_w = read_base(base)
    for p in m["sparsity"]["modules"]:
        W = base_w[f"{p}.weight"]
        keep, dense = kept_of(w, p, tuple(W.shape))
        score = W.float().abs()
        if strategy == "unstructured":
            want = ~lowest_by_argsort(score.view(1, -1), math.floor(W.numel() * Fraction(11, 20))).view(W.shape)
        else:
            want = ~nm_by_argsort(score, 2, 4)
        assert torch.equal(keep, want), p
        assert same_bits(dense, W.masked_fill(~keep, 0)), p


def test_bf16_base_keeps_its_bits(tmp_path):
    base = make_base(tmp_path / "base", "llama_gqa", dtype=torch.bfloat16)
    prune(base, tmp_path / "b", 0.5, strategy="unstructured", show_progress=False)
    m, w = check_sparse_bundle(tmp_path / "b", base, "unstructured", "magnitude")
    base_w = read_base(base)
    assert m["weights"]["dtype"] == m["base"]["dtype"] == "bfloat16"
    for p in m["sparsity"]["modules"]:
        keep, dense = kept_of(w, p, tuple(base_w[f"{p}.weight"].shape))
        assert same_bits(dense, base_w[f"{p}.weight"].masked_fill(~keep, 0)), p


def test_pattern_whose_ratio_has_no_exact_float(tmp_path):
    """1:3 removes 2/3: the manifest records the nearest float, which validate and a repeated --ratio accept."""
    base = make_base(
        tmp_path / "base", "llama_mha", hidden_size=48, intermediate_size=120, num_attention_heads=6, num_key_value_heads=6
    )
    m = prune(base, tmp_path / "b", None, strategy="semi-structured", pattern="1:3", show_progress=False)
    assert m["pruning"]["ratio"] == 2 / 3
    check_sparse_bundle(tmp_path / "b", base, "semi-structured", "magnitude")
    again = prune(base, tmp_path / "c", m["pruning"]["ratio"], strategy="semi-structured", pattern="1:3", show_progress=False)
    assert again["bundle_id"] == m["bundle_id"]


def test_sparse_bundle_logits_equal_the_dense_base_with_the_same_zeros(make_base_dir, tmp_path):
    """The stored masks and values, put back into the base's weights, are exactly the pruned model."""
    from loramkit.model.loader import load_pruned_model

    base = make_base_dir("qwen2")
    prune(base, tmp_path / "b", None, strategy="semi-structured", pattern="2:4", show_progress=False)
    m, w = stored(tmp_path / "b")
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m["sparsity"]["modules"]:
            lin = ref.get_submodule(p)
            keep, _dense = kept_of(w, p, tuple(lin.weight.shape))
            lin.weight.masked_fill_(~keep, 0)
    ids = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model = load_pruned_model(tmp_path / "b", dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert_close_eps(got, want, 8, msg="sparse bundle vs zero-filled base")  # the same matmuls; blocking may differ


# ============================================================================ sequential semantics


def _calib_file(tmp_path: Path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(sample_texts(40, seed=5)) + "\n", encoding="utf-8")
    return p


def whole_model_sequential(
    base: Path,
    arch: ArchSpec,
    layers: list[int],
    ids: torch.Tensor,
    importance: str,
    ratio: Fraction,
    pattern,
    sequential: bool = True,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each layer in turn: one float64 forward of the WHOLE model (earlier layers already pruned) with a
    hook on every projection summing its own input statistic, then that layer's projections pruned.
    ``sequential=False``: every statistic from the unpruned model (what the engine must not do).
    Per module: (kept, pruned weight, summed input statistic, weight before pruning)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    out = {}
    stats: dict[str, list] = {}

    def hook(path):
        def add(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # (N * T, in)
            s = x.square().sum(0) if importance == "wanda" else x.T @ x
            stats[path] = [stats[path][0] + s, stats[path][1] + x.shape[0]] if path in stats else [s, x.shape[0]]

        return add

    modules = {i: list(dict.fromkeys(projections(arch, [i]))) for i in layers}
    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for i in layers for p in modules[i]]
    if not sequential:
        with torch.no_grad():
            model(input_ids=ids)
        frozen = dict(stats)
    for i in layers:
        stats.clear()
        with torch.no_grad():
            model(input_ids=ids)
        for p in modules[i]:
            lin = model.get_submodule(p)
            s, n = (frozen if not sequential else stats)[p]
            if importance == "wanda":
                keep = sparse.wanda_mask(lin.weight, s, ratio, pattern)
                new = lin.weight.masked_fill(~keep, 0)
            else:
                keep, new = sparse.sparsegpt(lin.weight, sparse.hessian(s, n), ratio, pattern, dtype=torch.float64)
            out[p] = (keep, new.clone(), s.clone(), lin.weight.detach().clone())
            with torch.no_grad():
                lin.weight.copy_(new)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("case, importance, ratio, pattern", [
    ("llama_gqa", "wanda", Fraction(1, 2), None),
    ("phi3", "wanda", Fraction(1, 2), (2, 4)),
    ("qwen2", "sparsegpt", Fraction(1, 2), None),
    ("gemma2", "sparsegpt", Fraction(1, 2), (2, 4)),
])  # fmt: skip
def test_engine_is_sequential_like_the_whole_model(make_base_dir, tmp_path, case, importance, ratio, pattern):
    """The engine (one layer in memory, float64) against whole-model forwards: layer i's statistics come from
    the already-pruned layers before it, shared inputs (q/k/v, gate/up) summed once, fused Phi-3 modules whole."""
    base = make_base_dir(case)
    arch = ArchSpec.from_config(json.loads((base / "config.json").read_text()))
    calib = load_calibration(_calib_file(tmp_path), base, 256, SAMPLES, SEQ_LEN)
    layers = [2, 3, 5]  # an intact layer in between is run through
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    order = []

    def prune_layer(i, weights):
        order.append(i)
        res = {}
        for p, (wt, st) in weights.items():
            assert wt.dtype == torch.float64
            if importance == "wanda":
                keep = sparse.wanda_mask(wt, st.value, ratio, pattern)
                res[p] = (keep, wt.masked_fill(~keep, 0))
            else:
                res[p] = sparse.sparsegpt(wt, sparse.hessian(st.value, st.tokens), ratio, pattern, dtype=torch.float64)
        got.update(res)
        return {p: dense for p, (_k, dense) in res.items()}

    sequential_prune(base, arch, layers, calib, {"wanda": "squares", "sparsegpt": "gram"}[importance], prune_layer, F64)
    assert order == layers
    want = whole_model_sequential(base, arch, layers, calib.ids, importance, ratio, pattern)
    assert list(got) == list(want)
    for p, (keep, dense, *_) in want.items():
        assert torch.equal(got[p][0], keep), p
        assert_close_eps(got[p][1], dense, 1e4, msg=p)  # float64 both ways: summation order only
    # The test can tell: statistics of the unpruned model give other masks in the later layers.
    frozen = whole_model_sequential(base, arch, layers, calib.ids, importance, ratio, pattern, sequential=False)
    assert any(not torch.equal(frozen[p][0], want[p][0]) for p in want if p.startswith("model.layers.5."))


def test_wanda_bundle_follows_the_sequential_reference(make_base_dir, tmp_path):
    """The bundle (fp32 engine, default settings) keeps per row the weights the float64 sequential reference
    ranks highest; only scores within fp32 rounding of each other may trade places."""
    base = make_base_dir("llama_mha")
    calib_path = _calib_file(tmp_path)
    m = prune(base, tmp_path / "b", 0.5, strategy="unstructured", importance="wanda", calibration=calib_path,
              calibration_samples=SAMPLES, calibration_seq_len=SEQ_LEN, show_progress=False)  # fmt: skip
    _, w = check_sparse_bundle(tmp_path / "b", base, "unstructured", "wanda")
    assert m["pruning"]["calibration"]["num_tokens"] == SAMPLES * SEQ_LEN
    arch = ArchSpec.from_config(json.loads((base / "config.json").read_text()))
    calib = load_calibration(calib_path, base, 256, SAMPLES, SEQ_LEN)
    want = whole_model_sequential(base, arch, m["pruning"]["pruned_layers"], calib.ids, "wanda", Fraction(1, 2), None)
    base_w = read_base(base)
    for p, (want_keep, _new, sq, W64) in want.items():
        W = base_w[f"{p}.weight"]
        keep, dense = kept_of(w, p, tuple(W.shape))
        assert same_bits(dense, W.masked_fill(~keep, 0)), p  # kept values are the base's
        assert torch.equal(keep.sum(1), want_keep.sum(1)), p
        score = W64.abs() * sq.sqrt()  # (out, in) the reference's scores
        for r in (keep != want_keep).any(1).nonzero().flatten().tolist():  # a swapped pair must be a near tie
            gap = float(score[r][~keep[r]].max() - score[r][keep[r]].min())
            assert gap <= 64 * torch.finfo(torch.float32).eps * float(score[r].max()), f"{p} row {r}: gap {gap:.3g}"


def test_spilled_boundaries_give_the_same_bundle(make_base_dir, tmp_path):
    """Boundary activations on disk (--activation-budget 0) or in memory: the same bytes, the same bundle."""
    base = make_base_dir("gemma3")
    calib = _calib_file(tmp_path)
    (tmp_path / "spill").mkdir()
    ids = [
        prune(base, tmp_path / name, 0.5, strategy="unstructured", importance="sparsegpt", calibration=calib, calibration_samples=3,
              calibration_seq_len=32, show_progress=False, **extra)["bundle_id"]
        for name, extra in (("mem", {}), ("disk", {"activation_budget": 0, "offload_dir": tmp_path / "spill"}))
    ]  # fmt: skip
    assert ids[0] == ids[1]
    assert list((tmp_path / "spill").iterdir()) == []  # the spilled boundaries are removed


def test_failure_midway_leaves_nothing(make_base_dir, tmp_path, monkeypatch):
    """A failure while layers are being written (here: the third pruned layer) leaves no output, no spill, no scratch."""
    import loramkit.prune.sparse_writer as writer_mod

    base = make_base_dir("llama_gqa")
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) > 14:  # seven projections a layer: two layers are already written
            raise RuntimeError("boom")
        return sparse.sparsegpt(*args, **kw)

    monkeypatch.setattr(writer_mod, "sparsegpt", failing)
    (tmp_path / "spill").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        prune(base, tmp_path / "out", 0.5, strategy="unstructured", importance="sparsegpt", calibration=_calib_file(tmp_path),
              calibration_samples=2, calibration_seq_len=16, activation_budget=0, offload_dir=tmp_path / "spill",
              show_progress=False)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "spill"]
    assert list((tmp_path / "spill").iterdir()) == []


def test_sparsegpt_bundle(make_base_dir, tmp_path, capsys):
    """2:4 SparseGPT through the CLI: a valid bundle, kept values updated (OBS), reproducible bit for bit."""
    base = make_base_dir("llama_gqa")
    calib = _calib_file(tmp_path)
    times = []
    for out in ("a", "b"):
        t0 = time.perf_counter()
        rc = run(["prune", str(base), "--out", str(tmp_path / out), "--strategy", "semi-structured", "--pattern", "2:4",
                  "--importance", "sparsegpt", "--calibration", str(calib), "--calibration-samples", "8", "--seq-len", "32"])  # fmt: skip
        times.append(time.perf_counter() - t0)
        assert rc == 0
    line = capsys.readouterr().out
    assert "2:4, 35 projections stored sparse" in line
    m, w = check_sparse_bundle(tmp_path / "a", base, "semi-structured", "sparsegpt")
    assert m["bundle_id"] == json.loads((tmp_path / "b" / "loram.json").read_text())["bundle_id"]
    base_w = read_base(base)
    moved = 0
    for p in m["sparsity"]["modules"]:
        keep, dense = kept_of(w, p, tuple(base_w[f"{p}.weight"].shape))
        moved += int((dense[keep] != base_w[f"{p}.weight"][keep]).sum())
    assert moved > 0
    print(f"sparsegpt 2:4 prune of llama_gqa (8 x 32 tokens): {min(times):.2f} s")


# ============================================================================ refusals


@pytest.mark.parametrize("args, says", [
    (["--strategy", "semi-structured", "--pattern", "4:2"], "is not N:M"),
    (["--strategy", "semi-structured", "--pattern", "2:4", "--ratio", "0.6"], "contradicts --pattern 2:4"),
    (["--strategy", "semi-structured", "--pattern", "4:8"], "172 input columns, not a multiple of 8"),
    (["--strategy", "unstructured", "--ratio", "0.5", "--pattern", "2:4"], "is for --strategy semi-structured"),
    (["--strategy", "unstructured", "--ratio", "0.5", "--importance", "wanda"], "wanda importance needs --calibration"),
    (["--strategy", "unstructured", "--ratio", "0.5", "--importance", "taylor"], "not 'taylor'"),
    (["--strategy", "unstructured", "--ratio", "0.5", "--quantize", "nf4"], "quantize does not support sparse bundles"),
    (["--ratio", "0.5", "--importance", "sparsegpt"], "ranks single weights"),
    (["--ratio", "0.5", "--pattern", "2:4"], "is for --strategy semi-structured"),
])  # fmt: skip
def test_refusals(make_base_dir, tmp_path, capsys, args, says):
    base = make_base_dir("llama_gqa")
    line = _one_line_error(capsys, "prune", base, "--out", tmp_path / "out", *args)
    assert says in line, line
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("strategy", ["structured", "unstructured"])
def test_missing_ratio_is_a_usage_error(make_base_dir, tmp_path, capsys, strategy):
    rc = run(["prune", str(make_base_dir("llama_gqa")), "--out", str(tmp_path / "out"), "--strategy", strategy])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Missing option '--ratio'" in err[0], err
    assert not (tmp_path / "out").exists()


def test_mixture_of_experts_refused(make_base_dir, tmp_path, capsys):
    base = make_base_dir("qwen3_moe")
    line = _one_line_error(capsys, "prune", base, "--out", tmp_path / "out", "--strategy", "unstructured", "--ratio", "0.5")
    assert "mixture of experts is not supported" in line and "--strategy structured" in line
    assert not (tmp_path / "out").exists()
