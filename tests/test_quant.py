"""QLoRAM: 4-bit bundles (specs/bundle-v1.md 7.1), their loading, training and recovery.

The round-trip reference is bitsandbytes itself: the unquantized bundle loaded in bf16,
each q/k/v/o/gate/up/down swapped for a ``bnb.nn.Linear4bit`` quantized in memory the
way bitsandbytes documents (``Params4bit`` + ``.to(device)``). A bundle written by
``quantize_bundle`` and loaded by ``load_pruned_model`` must give the same bits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from loramkit import Bundle, cli
from loramkit import load_pruned_model as _load_pruned_model
from loramkit.bundle import quantization as qformat
from loramkit.bundle.manifest import FORMAT_VERSION, bundle_id, bundle_tag
from loramkit.bundle.validate import validate
from loramkit.bundle.writer import finalize
from loramkit.errors import BundleError
from loramkit.prune.pruner import prune
from loramkit.quant import convert, quantize_bundle
from loramkit.quant._bnb import bnb as _import_bnb
from tests.factory import CASE_NAMES
from tests.lora_helpers import TARGETS, copy_dir, peft_on_base, quiet

bnb = _import_bnb()
from loramkit.quant.layers import FlatBlockLinear4bit, build_linear4bit, use_safe_cpu_kernels  # noqa: E402

PRUNE_KW: dict[str, Any] = dict(keep_first=2, keep_last=1, importance="random", seed=0, show_progress=False)
# llama_mha: hidden 64, 8 heads of 8, intermediate 172 -> 86 in layers 2..6: gate/up have 86 or
# 172 outputs (not a multiple of 32) and down_proj 86 or 172 inputs (blocks of 64 span rows).
CASE = "llama_mha"
NF4 = dict(quant_type="nf4", double_quant=True)
FP4 = dict(quant_type="fp4", double_quant=False)
IDS = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(7))

_CACHE: dict[Any, Path] = {}


def load_pruned_model(path, **kw):
    """At the bundle's recorded compute dtype (bf16), whatever the CPU: these tests check the
    format and bitsandbytes' own bits there (the suite's bf16-off default would pick fp32)."""
    return _load_pruned_model(path, **({"compute_dtype": "bundle"} | kw))


@pytest.fixture(scope="module")
def shop(make_base_dir, tmp_path_factory) -> Any:
    """``shop.bundle(case)`` (16-bit, ratio 0.5) and ``shop.quantized(case, **kw)``, built once. READ-ONLY."""

    class Shop:
        def base(self, case: str = CASE) -> Path:
            return make_base_dir(case)

        def bundle(self, case: str = CASE) -> Path:
            if case not in _CACHE:
                out = tmp_path_factory.mktemp(f"quant_src_{case}") / "bundle"
                prune(self.base(case), out, 0.5, **PRUNE_KW)
                _CACHE[case] = out
            return _CACHE[case]

        def quantized(self, case: str = CASE, **kw: Any) -> Path:
            kw = {**NF4, **kw}
            key = (case, tuple(sorted(kw.items())))
            if key not in _CACHE:
                out = tmp_path_factory.mktemp(f"quant_{case}") / "bundle"
                quantize_bundle(self.bundle(case), out, show_progress=False, **kw)
                _CACHE[key] = out
            return _CACHE[key]

    return Shop()


def targets(b: Path) -> list[str]:
    bundle = Bundle(b)
    fam = bundle.arch.family
    return [fam.module(i, role) for i in range(bundle.arch.num_hidden_layers) for role in fam.modules]


def in_memory_reference(bundle: Path, quant_type: str, double_quant: bool, blocksize: int = 64) -> nn.Module:
    """The 16-bit bundle in bf16 with its Linears quantized by bitsandbytes in memory."""
    model = load_pruned_model(bundle, dtype=torch.bfloat16)
    for path in targets(bundle):
        lin = model.get_submodule(path)
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.bfloat16,
            compress_statistics=double_quant, quant_type=quant_type,
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            lin.weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
            quant_type=quant_type, module=q,
        )  # fmt: skip
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, q.to("cpu"))  # bitsandbytes quantizes on .to(device)
    use_safe_cpu_kernels(model)
    return model.eval()


def logits(model: nn.Module, *, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(IDS).logits.detach()


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "case, kw",
    [("llama_mha", NF4), ("qwen2", NF4), ("llama_gqa", FP4), ("qwen3", dict(quant_type="fp4", double_quant=True))],
    ids=["llama_mha-nf4", "qwen2-nf4", "llama_gqa-fp4", "qwen3-fp4-dq"],
)
def test_round_trip_is_bitwise_bitsandbytes(shop, case, kw):
    """quantize -> write bundle -> load_pruned_model == bitsandbytes quantizing the same weights in memory."""
    loaded = load_pruned_model(shop.quantized(case, **kw))
    ref = in_memory_reference(shop.bundle(case), **kw)
    got, want = loaded.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:  # packed codes, absmax, nested state, JSON blob, 16-bit tensors
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert torch.equal(logits(loaded), logits(ref))
    assert torch.equal(logits(loaded, grad=True), logits(ref, grad=True))
    assert torch.equal(logits(loaded), logits(loaded, grad=True))  # eval no_grad takes the training path


@pytest.mark.parametrize("kw", [NF4, FP4], ids=["nf4", "fp4"])
def test_close_to_the_unquantized_model(shop, make_base_dir, tmp_path, kw):
    """Loose: 4-bit logits stay near the 16-bit ones; an unrelated model of the same shape is ~sqrt(2) away."""
    full = logits(load_pruned_model(shop.bundle()))
    four = logits(load_pruned_model(shop.quantized(**kw))).float()
    rel = ((four - full).norm() / full.norm()).item()
    cos = nn.functional.cosine_similarity(four.flatten(), full.flatten(), dim=0).item()
    assert rel < 0.7 and cos > 0.8, (rel, cos)
    prune(make_base_dir(CASE, seed=1), tmp_path / "other", 0.5, **PRUNE_KW)
    other = logits(load_pruned_model(tmp_path / "other"))
    assert ((other - full).norm() / full.norm()).item() > 2 * rel


@pytest.mark.parametrize("case", CASE_NAMES)
def test_no_full_precision_linear_weight(shop, case):
    b = shop.quantized(case)
    m = json.loads((b / "loram.json").read_text())
    model = load_pruned_model(b)
    for path in targets(b):
        mod = model.get_submodule(path)
        assert isinstance(mod, bnb.nn.Linear4bit), path
        n = mod.in_features * mod.out_features
        assert mod.weight.dtype == torch.uint8 and tuple(mod.weight.shape) == ((n + 1) // 2, 1), path
        assert mod.compute_dtype == torch.bfloat16 and mod.support_avx512bf16_for_cpu is False
        assert isinstance(mod, FlatBlockLinear4bit) == bool(mod.in_features % 64), path
    plain = [n for n, mod in model.named_modules() if type(mod) is nn.Linear]
    assert plain == ["lm_head"]
    floats = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.uint8}
    assert set(floats.values()) == {torch.bfloat16}  # embeddings, norms, biases, lm_head
    assert model.is_loaded_in_4bit and model.quantization_method == "bitsandbytes"
    assert model.num_parameters() == m["parameters"]["pruned"]  # transformers counts 4-bit logically


def test_row_chunked_quantization_is_bitwise_whole_tensor(shop, tmp_path, monkeypatch):
    """The writer quantizes in chunks of whole blocks; tiny chunks must give the same bytes."""
    monkeypatch.setattr(convert, "_CHUNK_VALUES", 100)  # qwen2: 2 rows of 96, or 32 rows of 130
    out = tmp_path / "chunked"
    m = quantize_bundle(shop.bundle("qwen2"), out, show_progress=False)
    want = json.loads((shop.quantized("qwen2") / "loram.json").read_text())
    assert m["files"]["model.safetensors"] == want["files"]["model.safetensors"]


def test_sharded_source_and_output(shop, tmp_path):
    src = tmp_path / "sharded"
    prune(shop.base(), src, 0.5, max_shard_size="200KB", **PRUNE_KW)
    out = tmp_path / "q"
    m = quantize_bundle(src, out, max_shard_size="100KB", show_progress=False)
    assert len(m["weights"]["files"]) > 1 and m["weights"]["index"] == "model.safetensors.index.json"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == m["weights"]["files"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch files left
    assert validate(out) == ([], [])
    assert torch.equal(logits(load_pruned_model(out)), logits(load_pruned_model(shop.quantized())))


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize("kw", [NF4, dict(quant_type="fp4", double_quant=False, blocksize=128)], ids=["nf4", "fp4-128"])
def test_layout_and_manifest(shop, kw):
    src, b = shop.bundle(), shop.quantized(**kw)
    s, m = (json.loads((d / "loram.json").read_text()) for d in (src, b))
    qt, bs, dq = kw["quant_type"], kw.get("blocksize", 64), kw["double_quant"]
    assert m["format_version"] == FORMAT_VERSION and m["requires"] == ["quantization"]
    assert m["quantization"] == {
        "method": "bitsandbytes", "quant_type": qt, "blocksize": bs, "double_quant": dq,
        "compute_dtype": "bfloat16", "quant_storage": "uint8", "modules": targets(b),
        "unquantized": "embeddings, norms, biases and lm_head stay 16-bit",
    }  # fmt: skip
    assert m["weights"]["dtype"] == "bfloat16" and s["weights"]["dtype"] == "float32"
    for key in ("base", "architecture", "pruning", "parameters", "index_maps", "alignment"):
        assert m[key] == s[key], key
    for rel in ("config.json", "kept_indices.safetensors", "tokenizer.json"):
        assert m["files"][rel] == s["files"][rel], rel
    assert m["bundle_id"] != s["bundle_id"]

    from safetensors import safe_open

    with safe_open(str(b / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        w = "model.layers.3.mlp.down_proj.weight"  # pruned: [64, 86], 5504 values
        nb = math.ceil(64 * 86 / bs)
        want = {w: (torch.uint8, (2752, 1)), f"{w}.absmax": (torch.uint8 if dq else torch.float32, (nb,)),
                f"{w}.quant_map": (torch.float32, (16,))}  # fmt: skip
        if dq:
            want |= {f"{w}.nested_absmax": (torch.float32, (1,)), f"{w}.nested_quant_map": (torch.float32, (256,))}
        blob = f"{w}.quant_state.bitsandbytes__{qt}"
        assert {k for k in keys if k.startswith(w)} == {*want, blob}
        for k, (dt, shp) in want.items():
            t = f.get_tensor(k)
            assert (t.dtype, tuple(t.shape)) == (dt, shp), k
        state = json.loads(bytes(f.get_tensor(blob).numpy()))
        expected = {"quant_type": qt, "blocksize": bs, "dtype": "bfloat16", "shape": [64, 86]}
        if dq:
            expected |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": state["nested_offset"]}
            assert isinstance(state["nested_offset"], float) and state["nested_offset"] > 0
        assert state == expected
        assert f.get_tensor(f"{w}.quant_map").tolist() == list(qformat.QUANT_MAPS[qt])
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("case", CASE_NAMES)
def test_validate_sound_every_family(shop, case, capsys):
    for kw in (NF4, dict(quant_type="fp4", double_quant=False, blocksize=128)):
        b = shop.quantized(case, **kw)
        assert validate(b) == ([], []), (case, kw)
    assert cli.run(["validate", str(b)]) == 0
    assert f"sound (format {FORMAT_VERSION}" in capsys.readouterr().out


def _rewrite(d: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the weights, then re-hash and re-sign: only the content checks can object."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    finalize(d, json.loads((d / "loram.json").read_text()))


W = "model.layers.3.self_attn.q_proj.weight"


def _blob(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        key = f"{W}.quant_state.bitsandbytes__nf4"
        state = json.loads(bytes(t[key].numpy()))
        edit(state)
        t[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    return change


TAMPERING: dict[str, tuple[Callable[[dict], None], tuple[str, ...]]] = {
    "blocksize": (_blob(lambda s: s.update(blocksize=128)), ("quant_state", "blocksize")),
    "shape": (_blob(lambda s: s.update(shape=[64, 32])), ("quant_state", "shape")),
    "offset": (_blob(lambda s: s.pop("nested_offset")), ("nested_offset",)),
    "not-json": (
        lambda t: t.update({f"{W}.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)}),
        ("JSON",),
    ),
    "absmax-length": (lambda t: t.update({f"{W}.absmax": t[f"{W}.absmax"][:-1].clone()}), (f"{W}.absmax", "expected U8")),
    "nested-absmax-nan": (lambda t: t[f"{W}.nested_absmax"].fill_(float("nan")), (f"{W}.nested_absmax", "finite")),
    "quant-map": (lambda t: t.update({f"{W}.quant_map": torch.tensor(qformat.QUANT_MAPS["fp4"])}), ("code table",)),
    "packed-length": (lambda t: t.update({W: t[W][:-2].clone()}), (W, "expected U8")),
    "missing-state": (lambda t: t.pop(f"{W}.nested_quant_map"), ("lack", f"{W}.nested_quant_map")),
    "extra-state": (lambda t: t.update({f"{W}.code": torch.zeros(4)}), ("hold", f"{W}.code")),
    "norm-not-16-bit": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}), ("model.norm.weight", "BF16")),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_validate_catches_tampered_4bit_state(shop, tmp_path, capsys, how):
    change, needles = TAMPERING[how]
    d = copy_dir(shop.quantized(), tmp_path / "b")
    _rewrite(d, change)
    problems, _ = validate(d)
    assert any(all(n in p for n in needles) for p in problems), problems
    assert not [p for p in problems if "sha256" in p or "bundle_id" in p], problems
    assert cli.run(["validate", str(d)]) == 1
    if how not in ("nested-absmax-nan", "quant-map", "extra-state", "missing-state", "norm-not-16-bit"):
        with pytest.raises(BundleError):  # the loader checks layout and quant_state itself
            load_pruned_model(d)


def test_validate_catches_a_non_projection_module(shop, tmp_path):
    d = copy_dir(shop.quantized(), tmp_path / "b")
    m = json.loads((d / "loram.json").read_text())
    m["quantization"]["modules"].append("model.embed_tokens")
    m["bundle_id"] = bundle_id(m)
    (d / "loram.json").write_text(json.dumps(m))
    problems, _ = validate(d)
    assert any("model.embed_tokens" in p and "projection" in p for p in problems), problems
    with pytest.raises(BundleError, match="projection"):
        load_pruned_model(d)


# ---------------------------------------------------------------------------- versions


def _resign(d: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((d / "loram.json").read_text())
    edit(m)
    m["bundle_id"] = bundle_id(m)
    (d / "loram.json").write_text(json.dumps(m))


def test_a_1_0_bundle_still_reads(shop, tmp_path):
    d = copy_dir(shop.bundle(), tmp_path / "b")
    _resign(d, lambda m: m.update(format_version="1.0.0"))
    assert Bundle(d).manifest["format_version"] == "1.0.0"  # no migration: read as is
    assert validate(d) == ([], [])
    assert torch.equal(logits(load_pruned_model(d)), logits(load_pruned_model(shop.bundle())))


def test_feature_requirements(shop, tmp_path):
    b = shop.quantized()
    assert Bundle(b).manifest["requires"] == ["quantization"]  # a 4-bit bundle is read
    d = copy_dir(b, tmp_path / "unknown")
    _resign(d, lambda m: m.update(requires=["quantization", "something_else"]))
    with pytest.raises(BundleError, match="something_else.*upgrade"):
        Bundle(d)
    d = copy_dir(shop.bundle(), tmp_path / "claims")
    _resign(d, lambda m: m.update(requires=["quantization"]))  # feature without its section
    with pytest.raises(BundleError, match="schema"):
        Bundle(d)


# ---------------------------------------------------------------------------- bitsandbytes on CPU


def _has_avx512bf16() -> bool:
    return bool(bnb.functional.has_avx512bf16())  # the check Linear4bit itself makes


needs_avx512bf16 = pytest.mark.skipif(
    not _has_avx512bf16(), reason="this CPU lacks AVX512_BF16: bitsandbytes never repacks 4-bit weights here"
)


@needs_avx512bf16
def test_cpu_repacking_workaround_is_needed_and_applied(shop, monkeypatch):
    """Bug A: without the workaround, a no_grad eval forward asserts (gate_proj has 86/172 outputs)."""
    import loramkit.quant.layers as layers

    b = shop.quantized()
    with monkeypatch.context() as mp:
        mp.setattr(layers, "use_safe_cpu_kernels", lambda model: 0)
        raw = load_pruned_model(b)
        with pytest.raises(AssertionError, match="divisible by block_n"), torch.no_grad():
            raw(IDS)
    model = load_pruned_model(b)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    after = model.state_dict()  # what save_pretrained / PEFT would serialize
    assert all(torch.equal(after[k], before[k]) for k in before)


@needs_avx512bf16
def test_cpu_repacking_corrupts_state_without_the_workaround(shop):
    """Bug B: once repacked, a 4-bit module serializes different absmax; with the workaround it never repacks."""
    from safetensors import safe_open

    module = "model.layers.3.self_attn.q_proj"  # [32, 64]: repackable
    with safe_open(str(shop.quantized() / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith(f"{module}.weight")}
    state = {k.removeprefix(f"{module}.weight."): v for k, v in stored.items() if k != f"{module}.weight"}
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    for fixed in (False, True):
        lin = build_linear4bit(64, 32, stored[f"{module}.weight"], dict(state), None, torch.bfloat16).eval()
        if fixed:
            use_safe_cpu_kernels(lin)
        with torch.no_grad():
            lin(x)
        saved = lin.state_dict()
        same = all(torch.equal(saved[k.removeprefix(f"{module}.")], v) for k, v in stored.items())
        assert same is fixed


def _reference_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, bs: int) -> torch.Tensor:
    """Spec 7.1 in plain torch: flat blocks, high nibble first, float32 product."""
    flat = packed.as_subclass(torch.Tensor).reshape(-1)
    codes = torch.empty(flat.numel() * 2, dtype=torch.long)
    codes[0::2], codes[1::2] = (flat >> 4).long(), (flat & 15).long()
    n = shape[0] * shape[1]
    block = torch.arange(n) // bs
    return (code[codes[:n]] * absmax[block]).reshape(shape)


@pytest.mark.parametrize(
    "case, kw", [("llama_mha", NF4), ("qwen2", NF4), ("qwen2", FP4)], ids=["llama_mha-nf4", "qwen2-nf4", "qwen2-fp4"]
)
def test_every_4bit_layer_computes_its_stored_weight(shop, case, kw):
    """Each loaded 4-bit Linear == F.linear with the weight spec 7.1 defines from the file's tensors."""
    from safetensors import safe_open

    b = shop.quantized(case, **kw)
    model = load_pruned_model(b)
    with safe_open(str(b / "model.safetensors"), framework="pt") as f:
        for path in targets(b):
            w = f"{path}.weight"
            mod = model.get_submodule(path)
            state = json.loads(bytes(f.get_tensor(f"{w}.quant_state.bitsandbytes__{kw['quant_type']}").numpy()))
            absmax = f.get_tensor(f"{w}.absmax")
            if kw["double_quant"]:
                j = torch.arange(absmax.numel())
                nested = f.get_tensor(f"{w}.nested_quant_map")[absmax.long()] * f.get_tensor(f"{w}.nested_absmax")[j // 256]
                absmax = nested + torch.tensor(state["nested_offset"], dtype=torch.float32)
            dense = _reference_dequantize(f.get_tensor(w), absmax, f.get_tensor(f"{w}.quant_map"), state["shape"], 64)
            bias = f.get_tensor(f"{path}.bias") if f"{path}.bias" in f.keys() else None
            x = torch.randn(2, 3, mod.in_features, dtype=torch.bfloat16)
            assert torch.equal(mod(x), nn.functional.linear(x, dense.to(torch.bfloat16), bias)), path


def test_blocks_spanning_rows_are_computed_right_on_cpu():
    """Bug C: bitsandbytes' AVX512 dequantizer assumes whole blocks per row; 96 inputs / blocksize 64 do not."""
    torch.manual_seed(3)
    w = torch.randn(130, 96, dtype=torch.bfloat16)
    lin = bnb.nn.Linear4bit(96, 130, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=False, quant_type="nf4", module=lin)
    lin = lin.to("cpu")
    qs = lin.weight.quant_state
    dense = _reference_dequantize(lin.weight, qs.absmax, qs.code, (130, 96), 64).to(torch.bfloat16)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(dense, w) < 0.15  # the reference is a faithful NF4 copy of w
    x = torch.randn(3, 96, dtype=torch.bfloat16, requires_grad=True)
    want = nn.functional.linear(x, dense)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        # the bug, as shipped: rows past the first block get other blocks' constants
        assert rel(bnb.functional.dequantize_4bit(lin.weight, qs), dense) > 0.1
        assert not torch.equal(lin(x), want)
    use_safe_cpu_kernels(lin)
    assert isinstance(lin, FlatBlockLinear4bit)
    got = lin(x)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])
    with torch.no_grad():
        assert torch.equal(lin.eval()(x), want.detach())


# ---------------------------------------------------------------------------- LoRA, recovery


def test_qlora_training_then_recovery(shop, tmp_path, capsys):
    import peft
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from peft.utils.other import prepare_model_for_kbit_training

    b = shop.quantized()
    model = load_pruned_model(b)
    packed = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    with quiet():
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == len(targets(b))
    assert all(m.get_base_layer().compute_dtype == torch.bfloat16 for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        opt.step()
    assert losses[-1] < losses[0] - 0.5, losses
    now = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if p.dtype == torch.uint8
    }
    assert now.keys() == packed.keys() and all(torch.equal(now[n], packed[n]) for n in packed)

    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    card = (adapter / "README.md").read_text()
    assert bundle_tag(Bundle(b).bundle_id) in card
    assert cli.run(["recover", str(adapter), "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    full = peft_on_base(shop.base(), tmp_path / "full")  # strict: no missing / unexpected keys
    assert full(IDS).logits.isfinite().all()

    from loramkit.recover.adapter import Adapter, recover_tensors

    a = Adapter.read(adapter)
    via_4bit, via_16bit = recover_tensors(a, Bundle(b)), recover_tensors(a, Bundle(shop.bundle()))
    assert via_4bit.keys() == via_16bit.keys() and all(torch.equal(via_4bit[k], via_16bit[k]) for k in via_4bit)

    with quiet():  # PEFT's 4-bit merge re-quantizes W + BA: it must run and stay 4-bit
        merged = model.merge_and_unload()
    assert all(isinstance(merged.get_submodule(p), bnb.nn.Linear4bit) for p in targets(b))
    assert merged(IDS).logits.isfinite().all()


def test_float16_source_stays_float16(make_base_dir, tmp_path):
    prune(make_base_dir("qwen2", dtype=torch.float16), tmp_path / "b", 0.5, **PRUNE_KW)
    m = quantize_bundle(tmp_path / "b", tmp_path / "q", show_progress=False)
    assert m["weights"]["dtype"] == "float16" and validate(tmp_path / "q") == ([], [])
    model = load_pruned_model(tmp_path / "q")
    assert model.model.embed_tokens.weight.dtype == torch.float16 and logits(model).dtype == torch.float16


def test_loading_in_float32_keeps_4bit_linears(shop):
    model = load_pruned_model(shop.quantized(), dtype="float32")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    mod = model.get_submodule(targets(shop.quantized())[0])
    assert isinstance(mod, bnb.nn.Linear4bit) and mod.compute_dtype == torch.bfloat16
    assert logits(model).dtype == torch.float32


# ---------------------------------------------------------------------------- command line


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_cli_prune_quantize(shop, tmp_path, capsys):
    out = tmp_path / "qloram"
    rc = cli.run(["prune", str(shop.base()), "--out", str(out), "--ratio", "0.5", "--keep-first", "2", "--keep-last", "1",
                  "--importance", "random", "--quantize", "nf4"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "nf4 4-bit" in captured.out
    assert _listing(tmp_path) == ["qloram"]  # the 16-bit scratch bundle is gone
    m = Bundle(out).manifest
    assert m["quantization"]["quant_type"] == "nf4" and m["quantization"]["double_quant"] is True
    assert validate(out) == ([], [])
    # same pruning, same quantization: the same weights as quantizing the pruned bundle
    assert m["files"]["model.safetensors"] == Bundle(shop.quantized()).manifest["files"]["model.safetensors"]
    rc = cli.run(["prune", str(shop.base()), "--out", str(tmp_path / "bad"), "--ratio", "0.5", "--quantize", "int4"])
    assert rc == 2 and "'int4' is not one of 'nf4', 'fp4'" in capsys.readouterr().err  # a usage error, before any work
    assert _listing(tmp_path) == ["qloram"]


def test_cli_quantize_options_and_refusals(shop, tmp_path, capsys):
    out = tmp_path / "fp4"
    rc = cli.run(["quantize", str(shop.bundle()), "--out", str(out), "--type", "fp4", "--no-double-quant", "--blocksize", "128"])
    assert rc == 0, capsys.readouterr().err
    assert "fp4 (blocksize 128, no double quant" in capsys.readouterr().out
    q = Bundle(out).manifest["quantization"]
    assert (q["quant_type"], q["double_quant"], q["blocksize"]) == ("fp4", False, 128)

    rc = cli.run(["quantize", str(out), "--out", str(tmp_path / "twice")])
    err = capsys.readouterr().err
    assert rc == 1 and "already quantized" in err and len(err.strip().splitlines()) == 1
    rc = cli.run(["quantize", str(shop.bundle()), "--out", str(out)])
    assert rc == 1 and "already exists" in capsys.readouterr().err
    rc = cli.run(["quantize", str(shop.bundle()), "--out", str(tmp_path / "bs"), "--blocksize", "48"])
    assert rc == 1 and "blocksize 48" in capsys.readouterr().err
    assert _listing(tmp_path) == ["fp4"]


def test_inspect_says_what_stays_16_bit(shop, capsys):
    b = shop.quantized()
    assert cli.run(["inspect", str(b)]) == 0
    out = capsys.readouterr().out
    assert "nf4 4-bit (bitsandbytes, blocksize 64, double quant, compute bfloat16)" in out
    assert "4-bit: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in 8 layers (56 Linear modules" in out
    assert "16-bit: embeddings, norms, biases and lm_head stay bfloat16" in out
    assert cli.run(["inspect", str(b), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    weights = Bundle(b).manifest["files"]["model.safetensors"]["size"]
    assert 0 < s["quantized_bytes"]["4bit"] and sum(s["quantized_bytes"].values()) < weights
    assert s["quantization"]["quant_type"] == "nf4"
