"""load_pruned_model: the pruned model is the original with the pruned units switched off.

Key property: with whole KV groups / heads and MLP channels removed, the pruned model's
logits equal those of the ORIGINAL model in which the o_proj input columns of the pruned
query heads and the down_proj input columns of the pruned channels are zeroed. Which
columns to zero comes from the complement of the bundle's index maps.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramkit.errors import BundleError
from loramkit.model.loader import load_pruned_model
from loramkit.prune.pruner import prune
from tests.factory import VOCAB_SIZE, expected_shapes, sample_texts
from tests.tolerance import assert_close_eps

# ============================================================================ helpers


@pytest.fixture(scope="module")
def bundle_of(make_base_dir, tmp_path_factory):
    cache: dict[str, Path] = {}

    def _make(case: str, ratio: float = 0.5, **kw) -> Path:
        key = repr((case, ratio, sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("lbundle") / f"{case}-{ratio}"
            prune(make_base_dir(case), out, ratio, show_progress=False, **kw)
            cache[key] = out
        return cache[key]

    return _make


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "loram.json").read_text())


def maps_of(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "kept_indices.safetensors"))


def stored(bundle: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in manifest(bundle)["weights"]["files"]:
        out |= load_file(str(bundle / f))
    return out


def original(base_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


def zero_pruned(model: torch.nn.Module, maps: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Zero the input columns of o_proj / down_proj that the maps do NOT keep."""
    with torch.no_grad():
        for key, kept in maps.items():
            name, dim = key.rsplit(":", 1)
            if dim != "1":
                continue
            assert name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")), key
            w = model.get_parameter(name)
            drop = torch.ones(w.shape[1], dtype=torch.bool)
            drop[kept] = False
            assert drop.any()
            w[:, drop] = 0.0
    return model


def shifted_maps(maps: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    """The o_proj / down_proj column maps of the units one position further (mod count)."""
    s = expected_shapes(case)
    hd, G, Hkv, I = s["head_dim"], s["group_size"], s["num_key_value_heads"], s["intermediate_size"]
    out = {}
    for key, kept in maps.items():
        if key.endswith("o_proj.weight:1"):
            heads = kept[::hd] // hd
            groups = heads[::G] // G
            groups2 = ((groups + 1) % Hkv).sort().values
            assert not torch.equal(groups, groups2)
            heads2 = (groups2[:, None] * G + torch.arange(G)).reshape(-1)
            out[key] = (heads2[:, None] * hd + torch.arange(hd)).reshape(-1)
        elif key.endswith("down_proj.weight:1"):
            c2 = ((kept + 1) % I).sort().values
            assert not torch.equal(kept, c2)
            out[key] = c2
    return out


def inputs(batch: int = 3, length: int = 20) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0  # some right padding
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model, x) -> torch.Tensor:
    return model(**x).logits.double()


# ============================================================================ equivalence


def check_equivalence(b: Path, base: Path, case: str) -> None:
    maps = maps_of(b)
    assert any(k.endswith("o_proj.weight:1") for k in maps) and any(k.endswith("down_proj.weight:1") for k in maps)
    # In float64 the two differ by re-association only (the pruned sums skip zero terms): a
    # few hundred float64 eps at the largest logit, on any machine; a wrong unit is > 1e-2.
    pruned = load_pruned_model(b, dtype=torch.float64)
    x = inputs()
    got = logits(pruned, x)
    want = logits(zero_pruned(original(base, torch.float64), maps), x)
    assert_close_eps(got, want, 2**10)
    # teeth 1: the unzeroed original is clearly different (pruning removed something)
    assert (logits(original(base), x) - got).abs().max() > 1e-2
    # teeth 2: zeroing a DIFFERENT set of units gives different logits
    wrong = logits(zero_pruned(original(base), shifted_maps(maps, case)), x)
    assert (wrong - got).abs().max() > 1e-2


def test_pruned_logits_equal_original_with_pruned_units_zeroed(bundle_of, make_base_dir, family_case):
    check_equivalence(bundle_of(family_case), make_base_dir(family_case), family_case)


def test_pruned_logits_equal_zeroed_original_random_075(bundle_of, make_base_dir):
    b = bundle_of("llama_gqa", 0.75, importance="random", seed=3)
    m = manifest(b)
    assert m["architecture"]["layers"][3]["num_key_value_heads"]["kept"] == 1
    check_equivalence(b, make_base_dir("llama_gqa"), "llama_gqa")


def test_loaded_model_holds_the_bundle_weights(bundle_of, family_case):
    b = bundle_of(family_case)
    m = manifest(b)
    model = load_pruned_model(b)
    params = dict(model.named_parameters())
    st = stored(b)
    assert set(params) == set(st)  # a tied lm_head is reported once, under the embedding
    for n, t in st.items():
        assert params[n].dtype == t.dtype and torch.equal(params[n].detach(), t), n
        assert params[n].requires_grad
    assert model.num_parameters() == m["parameters"]["pruned"]
    assert not model.training
    # per-layer shapes follow the manifest
    s = expected_shapes(family_case)
    for d in m["architecture"]["layers"]:
        attn = model.model.layers[d["index"]].self_attn
        mlp = model.model.layers[d["index"]].mlp
        q, kv = (d[k]["kept"] * s["head_dim"] for k in ("num_attention_heads", "num_key_value_heads"))
        inter = d["intermediate_size"]["kept"]
        if hasattr(attn, "qkv_proj"):  # Phi-3: fused [Q | K | V] and [gate | up]
            assert attn.qkv_proj.out_features == q + 2 * kv and mlp.gate_up_proj.out_features == 2 * inter
            assert (attn.config.num_attention_heads, attn.num_key_value_heads) == (q // s["head_dim"], kv // s["head_dim"])
        else:
            assert (attn.q_proj.out_features, attn.k_proj.out_features, mlp.gate_proj.out_features) == (q, kv, inter)
        assert attn.o_proj.in_features == q
        assert mlp.down_proj.in_features == inter


# ============================================================================ dtype


def test_bfloat16_load(bundle_of, make_base_dir):
    case = "qwen2"
    b = bundle_of(case)
    model = load_pruned_model(b, dtype="bfloat16")
    st = stored(b)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, n
        assert torch.equal(p.detach(), st[n].to(torch.bfloat16)), n
    out = logits(model, inputs())
    ref = logits(load_pruned_model(b, dtype=torch.float32), inputs())
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()  # bf16 rounding, not garbage
    assert load_pruned_model(b).model.embed_tokens.weight.dtype == torch.float32  # "auto" is the bundle's


def test_unknown_dtype_refused(bundle_of):
    with pytest.raises(BundleError, match="dtype"):
        load_pruned_model(bundle_of("qwen2"), dtype="float8")


# ============================================================================ generate / peft


def test_generate_greedy_matches_zeroed_original(bundle_of, make_base_dir):
    case = "llama_gqa"
    b = bundle_of(case)
    tok = AutoTokenizer.from_pretrained(b)
    tok.padding_side = "left"
    enc = tok(sample_texts(2, seed=4), return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the prompts really are padded
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    model = load_pruned_model(b)
    out = model.generate(**enc, **kw)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    ref = zero_pruned(original(make_base_dir(case)), maps_of(b)).generate(**enc, **kw)
    assert torch.equal(out, ref)


def test_peft_step_changes_only_lora(bundle_of):
    import peft

    b = bundle_of("qwen3")
    model = load_pruned_model(b)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    assert pm.peft_config["default"].base_model_name_or_path == str(b.resolve())
    # LoRA modules take the pruned shapes of the layer they wrap
    layer = manifest(b)["pruning"]["pruned_layers"][0]
    q = pm.base_model.model.model.layers[layer].self_attn.q_proj
    down = pm.base_model.model.model.layers[layer].mlp.down_proj
    assert q.lora_B["default"].weight.shape == (q.base_layer.out_features, 4)
    assert down.lora_A["default"].weight.shape == (4, down.base_layer.in_features)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    pm.train()
    x = inputs()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    loss = pm(**x, labels=labels).loss
    loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "the step changed nothing"
    assert all("lora_B" in n for n in changed), sorted(changed)[:5]  # B starts at 0, so A gets no gradient yet
    assert len(changed) == len([n for n in before if "lora_B" in n])


# ============================================================================ identity


def test_name_or_path_and_tags(bundle_of, monkeypatch):
    b = bundle_of("mistral")
    bid = manifest(b)["bundle_id"]
    monkeypatch.chdir(b.parent)
    model = load_pruned_model(Path(b.name))  # a relative path still records the absolute one
    assert model.name_or_path == str(b.resolve())
    assert model.config._name_or_path == str(b.resolve())
    hex16 = bid.removeprefix("sha256:")[:16]
    assert len(hex16) == 16 and all(c in "0123456789abcdef" for c in hex16)
    assert f"loram-bundle-{hex16}" in model.model_tags
    assert "loram" in model.model_tags


def test_tied_embeddings_share_storage(bundle_of):
    model = load_pruned_model(bundle_of("llama_tied"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 3] += 1.0
    assert model.lm_head.weight[5, 3] == model.model.embed_tokens.weight[5, 3]


def test_untied_embeddings_are_separate(bundle_of):
    model = load_pruned_model(bundle_of("llama_gqa"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_rotary_buffers_equal_a_fresh_original(bundle_of, make_base_dir, family_case):
    model = load_pruned_model(bundle_of(family_case))
    fresh = original(make_base_dir(family_case))
    ours = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")}
    theirs = {n: m for n, m in fresh.named_modules() if type(m).__name__.endswith("RotaryEmbedding")}
    assert ours and set(ours) == set(theirs)
    for n in ours:
        a, b = dict(ours[n].named_buffers()), dict(theirs[n].named_buffers())
        assert set(a) == set(b) and any(k.endswith("inv_freq") for k in a)  # Gemma 3: one per layer type
        for k in a:
            assert not a[k].is_meta
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (n, k)
        assert getattr(ours[n], "attention_scaling", None) == getattr(theirs[n], "attention_scaling", None)
    # Other non-persistent buffers (Gemma's embed_scale) are rebuilt too, equal to the original's.
    theirs_buffers = dict(fresh.named_buffers())
    for k, t in model.named_buffers():
        assert not t.is_meta and t.dtype == theirs_buffers[k].dtype and torch.equal(t, theirs_buffers[k]), k


# ============================================================================ tampering


def _flip_data_byte(path: Path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, _ = header[tensor]["data_offsets"]
    raw[8 + n + begin] ^= 0x01  # lowest mantissa bit of the first element (little-endian)
    path.write_bytes(bytes(raw))


def test_tampered_weights_refused_unless_verify_false(bundle_of, tmp_path):
    src = bundle_of("llama_mha")
    b = tmp_path / "tampered"
    shutil.copytree(src, b)
    name = "model.layers.3.self_attn.q_proj.weight"
    _flip_data_byte(b / "model.safetensors", name)
    assert (b / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    with pytest.raises(BundleError, match="sha256") as ei:
        load_pruned_model(b)
    assert "model.safetensors" in str(ei.value)
    model = load_pruned_model(b, verify=False)
    got = model.get_parameter(name).detach()
    want = stored(src)[name]
    diff = (got != want).nonzero()
    assert diff.tolist() == [[0, 0]]  # exactly the flipped element
    # every other tensor is the untampered one
    clean = load_pruned_model(src)
    for n, p in clean.named_parameters():
        if n != name:
            assert torch.equal(p, model.get_parameter(n)), n


def test_tampered_config_refused(bundle_of, tmp_path):
    b = tmp_path / "cfg"
    shutil.copytree(bundle_of("llama_mha"), b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="sha256"):
        load_pruned_model(b)
