"""Merge: a recovered (full-model) adapter streamed into the original base's weights.

The reference is PEFT itself: ``PeftModel.from_pretrained(base, recovered)`` for logits and
``merge_and_unload()`` for tensors. Also checked: the base's dtype, shard files, index and
tokenizer files carry over unchanged; tensors the adapter does not touch are bit-identical;
a base that is not the bundle's base is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramkit import Bundle
from loramkit.errors import AdapterError, BaseModelError, OutputExistsError
from loramkit.recover.merge import merge_adapter
from tests.lora_helpers import (
    TARGETS,
    LoramShop,
    ids,
    listing,
    load_base,
    load_state,
    peft_on_base,
    read_adapter,
    shard_of,
)
from tests.tolerance import assert_close_eps

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json", "generation_config.json")


@pytest.fixture(scope="session")
def shop(tmp_path_factory, make_base_dir) -> LoramShop:
    return LoramShop(tmp_path_factory, make_base_dir)


def merge(base: Path, adapter: Path, out: Path, bundle: Path, **kw):
    return merge_adapter(base, adapter, out, bundle=Bundle(bundle), show_progress=False, **kw)


def adapted_weights(recovered: Path) -> set[str]:
    """Base tensor names the adapter changes: ``<module>.weight`` for each LoRA module."""
    out = set()
    for key in read_adapter(recovered)[1]:
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        out.add(f"{module}.weight")
    return out


def assert_same_layout(base: Path, merged: Path) -> None:
    """Same files, same tensor -> file map, same header metadata; side files byte for byte."""
    from safetensors import safe_open

    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert shard_of(merged) == shard_of(base)
    for f in base.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as a, safe_open(str(merged / f.name), framework="pt") as b:
            assert a.metadata() == b.metadata(), f.name
    for name in COPIED:
        if (base / name).exists():
            assert (merged / name).read_bytes() == (base / name).read_bytes(), name
    assert (base / "tokenizer.json").exists() and (base / "config.json").exists()


def assert_merge_matches_peft(base: Path, recovered: Path, merged: Path) -> None:
    # Logits in float64: PeftModel's W x + s B (A x) and the merged W' x then differ only by the
    # merged weights' one rounding to their stored float32 (2^-24 relative per weight), which
    # moves the logits by far less than 2^8 float32 eps at their largest; a wrong scale or a
    # missing module moves them by the adapter's whole effect (> 1e-3, asserted).
    peft = peft_on_base(base, recovered, dtype=torch.float64)
    x = ids()
    with torch.no_grad():
        want = peft(x).logits
        with peft.disable_adapter():
            plain = peft(x).logits
        got = load_base(merged, dtype=torch.float64)(x).logits
    assert (want - plain).abs().max() > 1e-3, "the adapter changes nothing: vacuous"
    assert_close_eps(got, want, 2**8, torch.float32, "merged vs PeftModel logits:")

    peft_merged = peft.merge_and_unload()  # PEFT's own merge, in float64 (not rounded)
    with torch.no_grad():
        assert_close_eps(got, peft_merged(x).logits, 2**8, torch.float32, "merged vs PEFT-merged logits:")
    ref = peft_merged.state_dict()
    merged_state, base_state = load_state(merged), load_state(base)
    assert merged_state.keys() == base_state.keys()
    adapted = adapted_weights(recovered)
    assert adapted <= merged_state.keys()
    for name, t in merged_state.items():
        assert t.dtype == base_state[name].dtype, name
        if name in adapted:  # W + s B A rounded to float32: within a few float32 eps of the exact sum
            assert_close_eps(t.double(), ref[name], 4, torch.float32, f"{name}:")
            assert not torch.equal(t, base_state[name]), name
        else:
            assert torch.equal(t, base_state[name]), f"{name} changed but is not adapted"


def test_merged_model_equals_peft_on_base(shop, family_case, tmp_path):
    base, bundle = shop.base(family_case), shop.bundle(family_case)
    recovered = shop.recovered(shop.adapter(bundle), bundle)
    out = tmp_path / "merged"
    summary = merge(base, recovered, out, bundle)
    assert summary["merged_modules"] == len(adapted_weights(recovered))
    assert_same_layout(base, out)
    assert_merge_matches_peft(base, recovered, out)
    assert listing(tmp_path) == ["merged", *(f"merged/{n}" for n in listing(out))]


VARIANTS = {
    "rslora": dict(use_rslora=True, lora_alpha=16),
    "patterns": dict(rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 32}),
    "lm_head_and_embeddings": dict(
        target_modules=[*TARGETS, "lm_head", "embed_tokens"], save_kw={"save_embedding_layers": False}
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_scaling_and_embeddings_match_peft(shop, tmp_path, variant):
    """alpha / sqrt(r), per-module alpha and rank, and the transposed embedding delta."""
    case = "llama_gqa"
    base, bundle = shop.base(case), shop.bundle(case)
    recovered = shop.recovered(shop.adapter(bundle, **VARIANTS[variant]), bundle)
    out = tmp_path / "merged"
    merge(base, recovered, out, bundle)
    assert_merge_matches_peft(base, recovered, out)


def test_sharded_base_merges_shard_by_shard(shop, tmp_path):
    case = "llama_gqa"
    base = shop.base(case, max_shard_size="200KB")
    assert (base / "model.safetensors.index.json").exists() and len(list(base.glob("*.safetensors"))) > 2
    bundle = shop.bundle(case, base_kw={"max_shard_size": "200KB"})
    recovered = shop.recovered(shop.adapter(bundle), bundle)
    out = tmp_path / "merged"
    merge(base, recovered, out, bundle)
    assert_same_layout(base, out)
    assert_merge_matches_peft(base, recovered, out)


def test_bf16_base_stays_bf16(shop, tmp_path):
    case = "qwen2"
    base_kw = {"dtype": torch.bfloat16, "max_shard_size": "200KB"}
    base = shop.base(case, **base_kw)
    assert len(list(base.glob("*.safetensors"))) > 1
    bundle = shop.bundle(case, base_kw=base_kw)
    assert Bundle(bundle).manifest["weights"]["dtype"] == "bfloat16"
    recovered = shop.recovered(shop.adapter(bundle), bundle)
    cfg, lora = read_adapter(recovered)
    out = tmp_path / "merged"
    merge(base, recovered, out, bundle)
    assert_same_layout(base, out)

    merged, base_state = load_state(out), load_state(base)
    adapted = adapted_weights(recovered)
    ref = peft_on_base(base, recovered, dtype=torch.bfloat16).merge_and_unload().state_dict()
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16, name
        if name not in adapted:
            assert torch.equal(t, base_state[name]), name
            continue
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        b, a = lora[f"{prefix}.lora_B.weight"].double(), lora[f"{prefix}.lora_A.weight"].double()
        exact = base_state[name].double() + b @ a * (cfg["lora_alpha"] / cfg["r"])
        # The native dtype, rounded once: within half a bf16 ulp of the exact sum (plus float32
        # slack). Rounding the delta to bf16 first, then the sum, misses this by up to ulp(delta)/2.
        _, exp = torch.frexp(t.double())
        half_ulp = torch.ldexp(torch.ones_like(exact), exp - 9)  # bf16: 8 significant bits
        err = (t.double() - exact).abs()
        assert (err <= half_ulp + exact.abs() * 2**-20).all(), f"{name}: not rounded once, max err {err.max()}"
        assert not torch.equal(t, base_state[name]), name
        # PEFT rounds the delta to bf16 before adding it: at most one bf16 ulp apart.
        torch.testing.assert_close(t.float(), ref[name].float(), rtol=2**-7, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- refusals


def refused(tmp_path: Path, call, error, *needles: str) -> None:
    parent = tmp_path / "outs"
    parent.mkdir(parents=True)
    out = parent / "merged"
    with pytest.raises(error) as info:
        call(out)
    for needle in needles:
        assert needle.lower() in str(info.value).lower(), f"{needle!r} not in {info.value}"
    assert not out.exists()
    assert listing(parent) == [], "temporary files left beside OUT"


def test_refuses_a_different_base_with_the_same_config(shop, tmp_path):
    case = "llama_mha"
    bundle = shop.bundle(case)
    recovered = shop.recovered(shop.adapter(bundle), bundle)
    other = shop.base(case, seed=1)
    assert (other / "config.json").read_bytes() == (shop.base(case) / "config.json").read_bytes()
    refused(tmp_path, lambda out: merge(other, recovered, out, bundle), BaseModelError, "differs")


def test_refuses_a_base_with_another_config(shop, tmp_path):
    case = "llama_mha"
    bundle = shop.bundle(case)
    recovered = shop.recovered(shop.adapter(bundle), bundle)
    other = shop.base(case, rms_norm_eps=1e-6)  # same tensors, other config
    assert load_state(other).keys() == load_state(shop.base(case)).keys()
    refused(tmp_path, lambda out: merge(other, recovered, out, bundle), BaseModelError, "config.json")


def test_refuses_the_unrecovered_adapter(shop, tmp_path):
    case = "llama_mha"
    base, bundle = shop.base(case), shop.bundle(case)
    refused(tmp_path, lambda out: merge(base, shop.adapter(bundle), out, bundle), AdapterError, "does not fit")


def test_existing_output_needs_overwrite(shop, tmp_path):
    case = "mistral"
    base, bundle = shop.base(case), shop.bundle(case)
    recovered = shop.recovered(shop.adapter(bundle), bundle)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        merge(base, recovered, out, bundle)
    assert listing(tmp_path) == ["merged", "merged/keep.txt"]
    merge(base, recovered, out, bundle, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert load_state(out).keys() == load_state(base).keys()
    assert [p for p in listing(tmp_path) if not p.startswith("merged")] == []
