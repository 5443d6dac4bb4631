"""Fast checks of the tiny-model factory (tests/factory.py) and its fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.factory import (
    BOS_ID,
    CASE_NAMES,
    EOS_ID,
    FAMILY_CASES,
    PAD_ID,
    UNK_ID,
    VOCAB_SIZE,
    expected_shapes,
    make_base,
    sample_texts,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)

# Intended shape rules per case: (hidden, heads, kv heads, head_dim, intermediate,
# qkv bias, q/k norm, tied, head_dim key in config.json, rope_type)
RULES = {
    "llama_mha": (64, 8, 8, 8, 172, False, False, False, False, "default"),
    "llama_gqa": (64, 16, 4, 16, 172, False, False, False, True, "llama3"),
    "llama_tied": (64, 8, 2, 8, 172, False, False, True, True, "llama3"),
    "mistral": (64, 8, 2, 8, 172, False, False, False, False, "default"),
    "qwen2": (96, 12, 4, 8, 260, True, False, False, False, "default"),
    "qwen3": (64, 8, 2, 16, 172, False, True, False, True, "default"),
    "gemma2": (64, 8, 4, 16, 172, False, False, True, True, "default"),
    "gemma3": (64, 8, 2, 16, 172, False, True, True, True, "linear"),
    "phi3": (64, 8, 2, 8, 172, False, False, False, False, "default"),
}


def _tensors(d: Path) -> dict[str, tuple[list[int], str, str]]:
    """name -> (shape, safetensors dtype string e.g. "F32", shard file name)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                out[k] = (list(sl.get_shape()), sl.get_dtype(), f.name)
    return out


def _ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(4, VOCAB_SIZE, (n, t), generator=torch.Generator().manual_seed(7))


def test_cases_cover_rules():
    assert set(CASE_NAMES) == set(RULES) == set(FAMILY_CASES)


def test_reload_gives_identical_logits(family_base_dir, family_case):
    ref = tiny_model(family_case)
    loaded = AutoModelForCausalLM.from_pretrained(family_base_dir).eval()
    assert type(loaded) is type(ref)
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids).logits, loaded(ids).logits
    assert torch.equal(a, b)
    # Non-trivial outputs: not flat, and different positions differ.
    assert a.std() > 0.3
    assert not torch.allclose(a[:, 0], a[:, -1])


def test_config_shape_rules(family_base_dir, family_case):
    hidden, h, kv, hd, inter, bias, qk_norm, tied, hd_key, rope_type = RULES[family_case]
    raw = json.loads((family_base_dir / "config.json").read_text())
    cfg = AutoConfig.from_pretrained(family_base_dir)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (hidden, 8, h)
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (kv, inter)
    # Qwen2Config and Phi3Config have no head_dim attribute at all in transformers 5.24.
    assert getattr(cfg, "head_dim", None) == (None if family_case in ("qwen2", "phi3") else hd)
    assert expected_shapes(cfg)["head_dim"] == hd
    assert cfg.vocab_size == VOCAB_SIZE == len(tiny_tokenizer())
    assert cfg.max_position_embeddings == 256
    assert bool(cfg.tie_word_embeddings) is tied
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma 3: per layer type
    assert rope["rope_type"] == rope_type
    assert cfg.dtype == torch.float32
    # Hub-style config.json.
    assert ("head_dim" in raw) is hd_key
    assert "rope_parameters" not in raw and "rope_theta" in raw
    assert ("rope_scaling" in raw) is (rope_type != "default")
    assert raw["torch_dtype"] == "float32" and "dtype" not in raw
    assert raw["architectures"] == [FAMILY_CASES[family_case]["_architecture"]]
    if family_case == "llama_gqa":
        assert hd != hidden // h  # explicit head_dim that is not hidden/heads
    if family_case == "mistral":
        assert cfg.sliding_window == 128 < cfg.max_position_embeddings
    if family_case.startswith("gemma"):  # a window shorter than test inputs, on some layers only
        assert cfg.sliding_window == 12 and {"sliding_attention", "full_attention"} == set(cfg.layer_types)
        assert "layer_types" not in raw
    # expected_shapes agrees with the saved config.
    exp = expected_shapes(cfg)
    assert (exp["group_size"], exp["qkv_bias"], exp["qk_norm"], exp["tied"]) == (h // kv, bias, qk_norm, tied)


def test_tensor_shape_rules(family_base_dir, family_case):
    hidden, h, kv, hd, inter, bias, qk_norm, tied, _, _ = RULES[family_case]
    ts = _tensors(family_base_dir)
    assert list(family_base_dir.glob("*.safetensors")) == [family_base_dir / "model.safetensors"]
    p = "model.layers.5."
    if family_case == "phi3":  # fused [Q | K | V] and [gate | up]
        assert ts[p + "self_attn.qkv_proj.weight"][0] == [(h + 2 * kv) * hd, hidden]
        assert ts[p + "mlp.gate_up_proj.weight"][0] == [2 * inter, hidden]
    else:
        assert ts[p + "self_attn.q_proj.weight"][0] == [h * hd, hidden]
        assert ts[p + "self_attn.k_proj.weight"][0] == [kv * hd, hidden]
        assert ts[p + "self_attn.v_proj.weight"][0] == [kv * hd, hidden]
        assert ts[p + "mlp.gate_proj.weight"][0] == [inter, hidden]
    assert ts[p + "self_attn.o_proj.weight"][0] == [hidden, h * hd]
    assert ts[p + "mlp.down_proj.weight"][0] == [hidden, inter]
    assert ts["model.embed_tokens.weight"][0] == [VOCAB_SIZE, hidden]
    assert {k.split(".")[2] for k in ts if k.startswith("model.layers.")} == {str(i) for i in range(8)}
    assert ("lm_head.weight" in ts) is (not tied)
    bias_keys = {k for k in ts if k.endswith(".bias")}
    if bias:
        assert bias_keys == {f"model.layers.{i}.self_attn.{n}_proj.bias" for i in range(8) for n in "qkv"}
        assert ts[p + "self_attn.k_proj.bias"][0] == [kv * hd]
    else:
        assert not bias_keys
    assert (p + "self_attn.q_norm.weight" in ts) is qk_norm
    assert (p + "self_attn.k_norm.weight" in ts) is qk_norm
    if qk_norm:
        assert ts[p + "self_attn.q_norm.weight"][0] == [hd]
    assert all(dt == "F32" for _, dt, _ in ts.values())


def test_norms_and_biases_randomised(family_case):
    model = tiny_model(family_case)
    sd = model.state_dict()
    norms = [k for k in sd if "norm" in k]
    assert norms
    for k in norms:
        assert not torch.allclose(sd[k], torch.ones_like(sd[k])), k
        assert (sd[k] - 1).abs().max() < 1.0
    for k in (k for k in sd if k.endswith(".bias")):
        assert sd[k].abs().min() > 0 and sd[k].std() > 0.01, k
    # Different layers' norms differ (a layer mix-up would be visible).
    assert not torch.equal(sd["model.layers.3.input_layernorm.weight"], sd["model.layers.6.input_layernorm.weight"])


def test_tied_model_shares_weights():
    model = tiny_model("llama_tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tiny_model("llama_gqa").lm_head.weight is not tiny_model("llama_gqa").model.embed_tokens.weight


def test_sharded_save(tmp_path, family_case):
    d = make_base(tmp_path / "m", family_case, max_shard_size="200KB", tokenizer=False)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ts = _tensors(d)
    assert set(index["weight_map"]) == set(ts)
    assert all(index["weight_map"][k] == f for k, (_, _, f) in ts.items())
    assert not (d / "tokenizer.json").exists()
    if family_case in ("llama_tied", "qwen2"):  # reload one tied and one biased sharded model
        loaded = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            assert torch.equal(loaded(_ids()).logits, tiny_model(family_case)(_ids()).logits)


def test_bf16_seed_and_overrides(tmp_path):
    d = make_base(tmp_path / "bf", "qwen3", dtype=torch.bfloat16, tokenizer=False)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ts = _tensors(d)
    assert all(dt == "BF16" for _, dt, _ in ts.values())
    m32, m16 = tiny_model("qwen3"), tiny_model("qwen3", dtype=torch.bfloat16)
    w32 = m32.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w32.to(torch.bfloat16), m16.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    # Same seed => same weights; other seed => different; global RNG untouched.
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    m_s1 = tiny_model("qwen3", seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(w32, m_s1.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(w32, tiny_model("qwen3").state_dict()["model.layers.0.self_attn.q_proj.weight"])
    # Overrides, incl. implicit head_dim following hidden/heads and rope options.
    c = tiny_config("llama_mha", hidden_size=128, num_hidden_layers=4)
    assert (c.hidden_size, c.head_dim, c.num_hidden_layers) == (128, 16, 4)
    c = tiny_config("llama_gqa", rope_scaling=None, rope_theta=1234.0)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 1234.0}
    d2 = make_base(tmp_path / "tf", "llama_gqa", config_style="transformers", tokenizer=False)
    raw = json.loads((d2 / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in raw
    with pytest.raises(KeyError):
        tiny_config("gpt2")


def test_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    assert len(tok) == tok.vocab_size == VOCAB_SIZE
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    text = sample_texts(1)[0]
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and UNK_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2  # BPE actually merged something
    msgs = [{"role": "user", "content": "Where is the red barn?"}, {"role": "assistant", "content": "Over there."}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<s><|user|>\nWhere is the red barn?</s>\n<|assistant|>\nOver there.</s>\n"
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|assistant|>\n")
    # Saved copy reloads with the same behaviour.
    tiny_tokenizer(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2(text).input_ids == ids and tok2.pad_token_id == PAD_ID
    assert tok2.apply_chat_template(msgs, tokenize=False) == rendered
    # Deterministic texts.
    assert sample_texts(8, seed=3) == sample_texts(8, seed=3) != sample_texts(8, seed=4)
    assert len(set(sample_texts(64))) > 50


def test_make_base_dir_cache(make_base_dir, base_dir):
    a = make_base_dir("mistral")
    assert base_dir("mistral") == a
    b = make_base_dir("mistral", seed=1)
    assert b != a
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / f).is_file()
