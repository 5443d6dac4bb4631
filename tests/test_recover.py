"""Recovery: a real PEFT LoRA adapter of the pruned model -> a PEFT adapter of the ORIGINAL model.

Every adapter here is made by PEFT itself (``get_peft_model(load_pruned_model(bundle))``,
``save_pretrained``), with random non-zero A and B. Properties checked:

- the recovered adapter loads on the original base with no missing and no unexpected keys
  (warnings are errors: PEFT only *warns* on missing keys), and its key set and shapes are
  exactly what PEFT saves for the same config on the base;
- the scatter is exact: kept rows of B / columns of A are the pruned ones bit for bit, the rest
  is zero, so the full delta is the pruned delta on the kept coordinates and zero elsewhere;
  modules of unpruned layers are byte-identical;
- the config carries over (r, alpha, rsLoRA, rank/alpha patterns) and names the original base;
- everything that cannot be recovered correctly is refused with a typed error, and then nothing
  is written (no OUT, no temporary directory left beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramkit import Bundle
from loramkit.bundle.manifest import bundle_tag
from loramkit.errors import AdapterError, BundleError, OutputExistsError
from loramkit.recover.adapter import recover_adapter
from tests.lora_helpers import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_KW,
    TARGETS,
    LoramShop,
    copy_dir,
    edit_config,
    expected_lora_state,
    ids,
    listing,
    load_state,
    lora_delta,
    peft_on_base,
    read_adapter,
    write_adapter_tensors,
)

LORA_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


@pytest.fixture(scope="session")
def shop(tmp_path_factory, make_base_dir) -> LoramShop:
    return LoramShop(tmp_path_factory, make_base_dir)


def _module_of(key: str) -> str:
    """``base_model.model.<module>.<lora part>`` -> ``<module>``."""
    for part in LORA_PARTS:
        if key.endswith(part):
            return key.removeprefix("base_model.model.").removesuffix(part)
    raise AssertionError(f"not a LoRA key: {key}")


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def assert_exact_scatter(bundle: Path, base: Path, adapter: Path, out: Path) -> None:
    """The recovery equations of METHOD.md, checked bitwise module by module."""
    b = Bundle(bundle)
    maps = b.index_maps
    pruned_layers = set(b.manifest["pruning"]["pruned_layers"])
    assert pruned_layers, "the bundle prunes nothing: the test would be vacuous"
    base_w, bundle_w = load_state(base), load_state(bundle)
    cfg, small = read_adapter(adapter)
    out_cfg, full = read_adapter(out)
    assert set(full) == set(small)

    seen = {"pruned": 0, "intact": 0}
    for key_a in sorted(k for k in small if k.endswith(".lora_A.weight")):
        module = _module_of(key_a)
        key_b = key_a.replace(".lora_A.weight", ".lora_B.weight")
        a, bm = small[key_a], small[key_b]
        a_full, b_full = full[key_a], full[key_b]
        assert a_full.dtype == a.dtype and b_full.dtype == bm.dtype
        weight = f"{module}.weight"
        out_f, in_f = base_w[weight].shape
        assert tuple(a_full.shape) == (a.shape[0], in_f), key_a
        assert tuple(b_full.shape) == (out_f, bm.shape[1]), key_b
        rows, cols = maps.get(f"{weight}:0"), maps.get(f"{weight}:1")

        if _layer_of(module) not in pruned_layers:
            assert rows is None and cols is None, module
            # Passed through untouched: same bytes.
            assert a_full.numpy().tobytes() == a.numpy().tobytes(), key_a
            assert b_full.numpy().tobytes() == bm.numpy().tobytes(), key_b
            seen["intact"] += 1
            continue

        # Every LoRAM target in a pruned layer has a pruned side at ratio 0.5.
        assert rows is not None or cols is not None, module
        rows = rows if rows is not None else torch.arange(out_f)
        cols = cols if cols is not None else torch.arange(in_f)
        assert len(rows) == bm.shape[0] and len(cols) == a.shape[1], module
        # The maps are the bundle's own geometry: the pruned weight is the base weight at (rows, cols).
        assert torch.equal(base_w[weight][rows][:, cols], bundle_w[weight]), weight
        row_mask = torch.ones(out_f, dtype=torch.bool)
        row_mask[rows] = False
        col_mask = torch.ones(in_f, dtype=torch.bool)
        col_mask[cols] = False

        assert torch.equal(b_full[rows], bm), key_b
        assert not b_full[row_mask].any(), f"{key_b}: non-zero rows at pruned outputs"
        assert torch.equal(a_full[:, cols], a), key_a
        assert not a_full[:, col_mask].any(), f"{key_a}: non-zero columns at pruned inputs"

        scale = cfg["lora_alpha"] / a.shape[0]
        d_small = lora_delta(bm, a, scale)
        d_full = lora_delta(b_full, a_full, scale)
        assert d_small.abs().max() > 0, module
        assert torch.equal(d_full[rows][:, cols], d_small), f"{module}: delta differs on kept coordinates"
        assert not d_full[row_mask].any() and not d_full[:, col_mask].any(), f"{module}: delta leaks into pruned channels"
        seen["pruned"] += 1
    assert seen["pruned"] and seen["intact"], seen


def assert_loads_cleanly(base: Path, adapter: Path, out: Path):
    """OUT loads on the original base, every key used, and is exactly what PEFT would save."""
    from peft.utils import get_peft_model_state_dict

    _, full = read_adapter(out)
    # The key set and shapes PEFT saves for the same config on the full base: a recovered adapter
    # missing a module (PEFT would only warn and leave B = 0) or adding one fails here.
    want = expected_lora_state(base, adapter)
    assert {k: tuple(v.shape) for k, v in full.items()} == want
    model = peft_on_base(base, out)  # raises on any warning, missing keys included
    # What PEFT loaded is exactly OUT (not B = 0 somewhere).
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(loaded) == set(full)
    for k, t in full.items():
        assert torch.equal(loaded[k].to(t.dtype), t), k
    return model


# --------------------------------------------------------------------------- 1 + 2: every family


def test_recovered_adapter_is_exact_and_loads_on_base(shop, family_case):
    base, bundle = shop.base(family_case), shop.bundle(family_case)
    adapter = shop.adapter(bundle)
    out = shop.recovered(adapter, bundle)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert_exact_scatter(bundle, base, adapter, out)
    model = assert_loads_cleanly(base, adapter, out)
    # The recovered adapter does something on the original model.
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    assert (adapted - plain).abs().max() > 1e-3


def test_pruned_adapter_does_not_fit_base(shop):
    """Control for the test above: the un-recovered adapter is refused by PEFT on the base."""
    base, bundle = shop.base("llama_gqa"), shop.bundle("llama_gqa")
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_on_base(base, shop.adapter(bundle))


CONFIG_VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "patterns": {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 32}},
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_config_carries_over_and_names_the_base(shop, variant):
    case = "qwen2"
    revision = "0123456789abcdef0123456789abcdef01234567"
    base = shop.base(case)
    bundle = shop.bundle(case, base_name="tiny-org/tiny-qwen2", base_revision=revision)
    adapter = shop.adapter(bundle, **CONFIG_VARIANTS[variant])
    out = shop.recovered(adapter, bundle)

    cfg, small = read_adapter(adapter)
    out_cfg, full = read_adapter(out)
    assert cfg["base_model_name_or_path"] == str(Path(bundle).resolve())
    assert out_cfg["base_model_name_or_path"] == "tiny-org/tiny-qwen2"
    assert out_cfg["revision"] == revision
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "peft_type"):
        assert out_cfg[field] == cfg[field], field
    assert {k: v for k, v in out_cfg.items() if k not in ("base_model_name_or_path", "revision")} == {
        k: v for k, v in cfg.items() if k not in ("base_model_name_or_path", "revision")
    }
    assert sorted(out_cfg["target_modules"]) == sorted(TARGETS)
    if variant == "patterns":
        q = [k for k in full if "q_proj.lora_A" in k]
        assert q and all(full[k].shape[0] == 8 for k in q)
        assert all(v.shape[0] == 4 for k, v in full.items() if "lora_A" in k and "q_proj" not in k)
    card = (out / "README.md").read_text()
    assert "tiny-org/tiny-qwen2" in card and Bundle(bundle).bundle_id in card
    assert_exact_scatter(bundle, base, adapter, out)
    assert_loads_cleanly(base, adapter, out)


# --------------------------------------------------------------------------- 4: lm_head and embeddings


def test_lm_head_and_embedding_lora_pass_through(shop):
    case = "llama_gqa"
    base, bundle = shop.base(case), shop.bundle(case)
    adapter = shop.adapter(bundle, target_modules=[*TARGETS, "lm_head", "embed_tokens"], save_kw={"save_embedding_layers": False})
    _, small = read_adapter(adapter)
    extra = {k for k in small if "lm_head" in k or "embed_tokens" in k}
    assert extra == {
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.lm_head.lora_B.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    }
    out = shop.recovered(adapter, bundle)
    _, full = read_adapter(out)
    for k in extra:
        assert full[k].numpy().tobytes() == small[k].numpy().tobytes(), k
    assert_exact_scatter(bundle, base, adapter, out)
    assert_loads_cleanly(base, adapter, out)


def test_lm_head_lora_on_tied_embeddings_passes_through(shop):
    """With tied embeddings the base stores no ``lm_head.weight``, but lm_head is still a module
    PEFT adapts (it warns about ``ensure_weight_tying``, nothing else); it is never pruned."""
    case = "llama_tied"
    base, bundle = shop.base(case), shop.bundle(case)
    adapter = shop.adapter(bundle, target_modules=["q_proj", "lm_head"], save_kw={"save_embedding_layers": False})
    _, small = read_adapter(adapter)
    assert "base_model.model.lm_head.lora_B.weight" in small
    out = shop.recovered(adapter, bundle)
    _, full = read_adapter(out)
    for k in ("base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"):
        assert full[k].numpy().tobytes() == small[k].numpy().tobytes(), k
    assert {k: tuple(v.shape) for k, v in full.items()} == expected_lora_state(base, adapter)


def test_embedding_target_saved_with_peft_defaults(shop, tmp_path):
    """PEFT's default save of an embedding-targeting adapter also stores the (unpruned) embedding
    and lm_head weights (``save_embedding_layers`` turns itself on). Recovery must either produce
    an adapter that behaves like the LoRA-only one on the base, or refuse saying how to re-save."""
    case = "llama_gqa"
    base, bundle = shop.base(case), shop.bundle(case)
    targets = [*TARGETS, "lm_head", "embed_tokens"]
    default = shop.adapter(bundle, target_modules=targets)
    lean = shop.adapter(bundle, target_modules=targets, save_kw={"save_embedding_layers": False})
    _, d = read_adapter(default)
    assert any(k.endswith("base_layer.weight") for k in d)  # what PEFT really does
    out = tmp_path / "out"
    try:
        recover_adapter(default, out, bundle)
    except AdapterError as exc:
        assert "save_embedding_layers" in str(exc), str(exc)
        assert not out.exists()
        return
    x = ids()
    with torch.no_grad():
        got = peft_on_base(base, out)(x).logits
        want = peft_on_base(base, shop.recovered(lean, bundle))(x).logits
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- 5: refusals


def refused(tmp_path: Path, call, error=AdapterError, *needles: str):
    """``call(out)`` raises ``error`` naming every needle, and leaves nothing behind."""
    parent = tmp_path / "outs"
    parent.mkdir(parents=True)
    out = parent / "recovered"
    with pytest.raises(error) as info:
        call(out)
    msg = str(info.value)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    assert not out.exists()
    assert listing(parent) == [], "temporary files left beside OUT"
    return msg


@pytest.mark.parametrize("evidence", ["card_and_name", "card_only", "name_only"])
def test_refuses_adapter_of_another_bundle_with_same_shapes(shop, tmp_path, evidence):
    case = "mistral"
    b0, b1 = shop.bundle(case, seed=0), shop.bundle(case, seed=1)
    m0, m1 = Bundle(b0), Bundle(b1)
    # Same kept dims everywhere, different channels: only the evidence can tell them apart.
    assert m0.manifest["architecture"]["layers"] == m1.manifest["architecture"]["layers"]
    assert any(not torch.equal(m0.index_maps[k], m1.index_maps[k]) for k in m0.index_maps)
    adapter = copy_dir(shop.adapter(b0), tmp_path / "adapter")
    assert bundle_tag(m0.bundle_id) in (adapter / "README.md").read_text()
    if evidence == "card_only":
        edit_config(adapter, base_model_name_or_path=None)
    elif evidence == "name_only":
        (adapter / "README.md").unlink()
    refused(tmp_path, lambda out: recover_adapter(adapter, out, b1), AdapterError, "trained on")
    # Control: the edited adapter still recovers with its own bundle.
    recover_adapter(adapter, tmp_path / "ok", b0)
    assert read_adapter(tmp_path / "ok")[1].keys() == read_adapter(shop.recovered(shop.adapter(b0), b0))[1].keys()


def test_refuses_adapter_whose_shapes_do_not_match(shop, tmp_path):
    case = "llama_mha"
    b50, b25 = shop.bundle(case), shop.bundle(case, ratio=0.25)
    adapter = copy_dir(shop.adapter(b50), tmp_path / "adapter")
    refused(tmp_path / "a", lambda out: recover_adapter(adapter, out, b25), AdapterError, "trained on")
    # Without the card and the name, the shapes alone refuse it.
    (adapter / "README.md").unlink()
    edit_config(adapter, base_model_name_or_path=None)
    refused(tmp_path / "b", lambda out: recover_adapter(adapter, out, b25), AdapterError, "shape")


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ("layers.3.self_attn.q_proj", "layers.3.self_attn.x_proj", "layers.3.self_attn.x_proj"),
        ("layers.3.", "layers.99.", "layers.99"),
        ("layers.3.self_attn.q_proj", "layers.3.input_layernorm", "layers.3.input_layernorm"),
    ],
    ids=["unknown_name", "layer_out_of_range", "not_a_linear"],
)
def test_refuses_unknown_target_module(shop, tmp_path, old, new, needle):
    bundle = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(bundle), tmp_path / "adapter")
    _, tensors = read_adapter(adapter)
    edited = {k.replace(old, new): v for k, v in tensors.items()}
    assert edited.keys() != tensors.keys()
    write_adapter_tensors(adapter, edited)
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, needle)


@pytest.mark.parametrize("drop", ["lora_B", "lora_A"])
def test_refuses_module_missing_one_matrix(shop, tmp_path, drop):
    """A module with A but no B (or B but no A) would load with a PEFT warning and B = 0."""
    bundle = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(bundle), tmp_path / "adapter")
    _, tensors = read_adapter(adapter)
    gone = f"base_model.model.model.layers.3.mlp.up_proj.{drop}.weight"
    write_adapter_tensors(adapter, {k: v for k, v in tensors.items() if k != gone})
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, "layers.3.mlp.up_proj")


def _other_configs():
    from peft import IA3Config, LoHaConfig, LoraConfig

    return {
        "dora": (LoraConfig(**LORA_KW, use_dora=True), ("DoRA", "unsupported")),
        "ia3": (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), ("IA3", "unsupported")),
        "loha": (LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]), ("LOHA", "unsupported")),
        "modules_to_save": (LoraConfig(**LORA_KW, modules_to_save=["lm_head"]), ("modules_to_save",)),
    }


@pytest.mark.parametrize("kind", ["dora", "ia3", "loha", "modules_to_save"])
def test_refuses_what_is_not_plain_lora(shop, tmp_path, kind):
    config, needles = _other_configs()[kind]
    bundle = shop.bundle("llama_gqa")
    adapter = shop.pruned_adapter_with(bundle, config)
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, *needles)


def test_refuses_adapter_trained_on_the_full_base(shop, tmp_path):
    from peft import LoraConfig

    base, bundle = shop.base("qwen3"), shop.bundle("qwen3")
    adapter = copy_dir(shop.full_adapter(base, LoraConfig(**LORA_KW)), tmp_path / "adapter")
    # PEFT records the path the base was loaded from; the bundle records the base it was pruned from.
    assert Path(read_adapter(adapter)[0]["base_model_name_or_path"]).resolve() == base.resolve()
    edit_config(adapter, base_model_name_or_path=Bundle(bundle).base["name_or_path"])
    refused(tmp_path / "a", lambda out: recover_adapter(adapter, out, bundle), AdapterError, "full base")
    # The name spelled another way (a symlink to the base): still refused, by the shapes.
    link = tmp_path / "base-link"
    link.symlink_to(base, target_is_directory=True)
    edit_config(adapter, base_model_name_or_path=str(link))
    refused(tmp_path / "b", lambda out: recover_adapter(adapter, out, bundle), AdapterError)
    # An already recovered adapter is a full-base adapter too: recovering it twice is refused.
    again = shop.recovered(shop.adapter(bundle), bundle)
    refused(tmp_path / "c", lambda out: recover_adapter(again, out, bundle), AdapterError, "full base")


def test_refuses_missing_adapter_files(shop, tmp_path):
    bundle = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(bundle), tmp_path / "adapter")
    weights = (adapter / ADAPTER_WEIGHTS).read_bytes()
    (adapter / ADAPTER_WEIGHTS).unlink()
    refused(tmp_path / "a", lambda out: recover_adapter(adapter, out, bundle), AdapterError, ADAPTER_WEIGHTS)
    (adapter / "adapter_model.bin").write_bytes(b"not read")
    refused(tmp_path / "b", lambda out: recover_adapter(adapter, out, bundle), AdapterError, ADAPTER_WEIGHTS, "pickle")
    (adapter / "adapter_model.bin").unlink()
    (adapter / ADAPTER_WEIGHTS).write_bytes(weights)
    (adapter / ADAPTER_CONFIG).unlink()
    refused(tmp_path / "c", lambda out: recover_adapter(adapter, out, bundle), AdapterError, ADAPTER_CONFIG)
    refused(tmp_path / "d", lambda out: recover_adapter(tmp_path / "nowhere", out, bundle), AdapterError, "nowhere")


@pytest.mark.parametrize("keep", [0, 7, 100, "half", "all_but_one"])
def test_refuses_truncated_adapter_weights(shop, tmp_path, keep):
    bundle = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(bundle), tmp_path / "adapter")
    data = (adapter / ADAPTER_WEIGHTS).read_bytes()
    n = {"half": len(data) // 2, "all_but_one": len(data) - 1}.get(keep, keep)
    (adapter / ADAPTER_WEIGHTS).write_bytes(data[:n])
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, ADAPTER_WEIGHTS, "unreadable")


def test_bundle_found_from_base_model_name_or_path(shop, tmp_path):
    bundle = shop.bundle("qwen2")
    adapter = shop.adapter(bundle)
    assert Path(read_adapter(adapter)[0]["base_model_name_or_path"]) == Path(bundle).resolve()
    summary = recover_adapter(adapter, tmp_path / "out")
    assert summary["bundle_id"] == Bundle(bundle).bundle_id
    ref = shop.recovered(adapter, bundle)
    assert (tmp_path / "out" / ADAPTER_WEIGHTS).read_bytes() == (ref / ADAPTER_WEIGHTS).read_bytes()
    assert (tmp_path / "out" / ADAPTER_CONFIG).read_bytes() == (ref / ADAPTER_CONFIG).read_bytes()
    # No --bundle and a name that is not a bundle: refused, asking for --bundle.
    moved = copy_dir(adapter, tmp_path / "adapter")
    edit_config(moved, base_model_name_or_path=str(tmp_path / "gone"))
    refused(tmp_path / "x", lambda out: recover_adapter(moved, out), AdapterError, "--bundle")
    # ... but with the bundle given, the card's tag is enough evidence.
    recover_adapter(moved, tmp_path / "y", bundle)
    assert (tmp_path / "y" / ADAPTER_WEIGHTS).read_bytes() == (ref / ADAPTER_WEIGHTS).read_bytes()


def test_existing_output_needs_overwrite(shop, tmp_path):
    bundle = shop.bundle("llama_tied")
    adapter = shop.adapter(bundle)
    parent = tmp_path / "outs"
    out = parent / "recovered"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        recover_adapter(adapter, out, bundle)
    assert listing(parent) == ["recovered", "recovered/keep.txt"]
    recover_adapter(adapter, out, bundle, overwrite=True)
    assert listing(parent) == ["recovered", *(f"recovered/{n}" for n in ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS])]
    ref = shop.recovered(adapter, bundle)
    assert (out / ADAPTER_WEIGHTS).read_bytes() == (ref / ADAPTER_WEIGHTS).read_bytes()


# ---------------------------------------------------------------------------- issue 13: PEFT's own rules, before recovery


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"r": 3}, "r=3"),  # the tensors have another rank
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"r": True}, "positive integer"),
        ({"rank_pattern": {"q_proj": 2}}, "r=2"),
        (
            {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "not_there"]},
            "not_there",
        ),
        ({"target_modules": ["k_proj"]}, "does not name"),  # tensors for modules the config does not target
    ],
    ids=["rank", "alpha-string", "alpha-nan", "r-bool", "rank-pattern", "target-without-tensors", "tensors-not-targeted"],
)
def test_refuses_adapters_peft_could_not_load(shop, tmp_path, config, needle):
    """Before: recover wrote these adapters, which PEFT then refuses (or loads wrongly)."""
    bundle = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(bundle), tmp_path / "adapter")
    edit_config(adapter, **config)
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, needle)


def test_refuses_non_finite_adapter_tensors(shop, tmp_path):
    """Before: an adapter trained with --alpha nan recovered (exit 0) into NaN everywhere."""
    bundle = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(bundle), tmp_path / "adapter")
    _, tensors = read_adapter(adapter)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    write_adapter_tensors(adapter, tensors)
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, "non-finite", key)


def test_refuses_a_merge_that_overflows(shop, tmp_path):
    """Finite adapter values whose product overflows the base's dtype: refused, nothing written."""
    from loramkit.recover.merge import merge_adapter

    case = "llama_gqa"
    base, bundle = shop.base(case), shop.bundle(case)
    recovered = copy_dir(shop.recovered(shop.adapter(bundle), bundle), tmp_path / "recovered")
    _, tensors = read_adapter(recovered)
    tensors = {k: (v * 1e30 if "lora_" in k else v) for k, v in tensors.items()}  # B @ A ~ 1e60: beyond float32
    write_adapter_tensors(recovered, tensors)
    refused(
        tmp_path, lambda out: merge_adapter(base, recovered, out, Bundle(bundle), show_progress=False), AdapterError, "non-finite"
    )


@pytest.mark.parametrize("how", ["negative", "duplicate", "unsorted"])
def test_recover_refuses_index_maps_validate_rejects(shop, tmp_path, how):
    """Before: recover with such maps (re-signed so the hashes pass) exited 0, rows scattered wrongly."""
    from safetensors.torch import load_file, save_file

    from loramkit.bundle.hashing import sha256_file
    from loramkit.bundle.manifest import bundle_id

    src = shop.bundle("llama_gqa")
    adapter = copy_dir(shop.adapter(src), tmp_path / "adapter")
    for evidence in ("README.md", "loram_adapter.json"):  # the re-signed bundle has another id: no evidence
        (adapter / evidence).unlink(missing_ok=True)
    edit_config(adapter, base_model_name_or_path=None)
    bundle = copy_dir(src, tmp_path / "bundle")
    maps = load_file(str(bundle / "kept_indices.safetensors"))
    key = next(k for k in sorted(maps) if k.endswith("q_proj.weight:0"))
    t = maps[key].clone()
    if how == "negative":
        t[0] = -1
    elif how == "duplicate":
        t[1] = t[0]
    else:
        t[[0, 1]] = t[[1, 0]]
    maps[key] = t
    save_file(maps, str(bundle / "kept_indices.safetensors"))
    m = json.loads((bundle / "loram.json").read_text())
    m["files"]["kept_indices.safetensors"] = {"sha256": sha256_file(bundle / "kept_indices.safetensors"),
                                             "size": (bundle / "kept_indices.safetensors").stat().st_size}  # fmt: skip
    m["bundle_id"] = bundle_id(m)
    (bundle / "loram.json").write_text(json.dumps(m))
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), BundleError, "index map", key)
