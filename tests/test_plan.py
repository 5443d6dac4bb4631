"""The counting rule (loramkit.families.pruning_rules): which layers are pruned and how many units they keep.

Every expectation is computed here independently, with :mod:`decimal` on the ratio's
shortest repr (the spec's wording, 4.3), never with the package's own helpers.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from loramkit.errors import LoramError
from loramkit.families import ArchSpec
from loramkit.families.geometry import LayerDims
from loramkit.families.pruning_rules import exact_ratio, kept_units, layers_kept_intact, plan_layers

DATA = Path(__file__).parent / "data"

RATIOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]


# ----------------------------------------------------------------------------- oracles


def _dec(ratio: float) -> Decimal:
    return Decimal(repr(ratio))


def _floor(x: Decimal) -> int:
    return int(x.to_integral_value(rounding=ROUND_FLOOR))


def _ceil(x: Decimal) -> int:
    return int(x.to_integral_value(rounding=ROUND_CEILING))


def oracle_kv_groups(h_kv: int, ratio: float) -> int:
    return max(1, h_kv - _floor(h_kv * _dec(ratio)))


def oracle_mha_heads(h: int, ratio: float) -> int:
    return max(1, _floor(h * (1 - _dec(ratio))))


def oracle_channels(i: int, ratio: float) -> int:
    return max(1, i - _ceil(i * _dec(ratio)))


def oracle_intact(num_layers: int) -> tuple[int, int]:
    """Defaults as documented in layers_kept_intact: min(4, L // 4), min(2, L // 6)."""
    return min(4, num_layers // 4), min(2, num_layers // 6)


def count_params(arch: ArchSpec, layers: list[LayerDims], *, qkv_bias: bool, qk_norm: bool) -> int:
    """Parameter count as transformers counts it, from per-layer kept dims (independent of the package).

    embeddings + lm_head (unless tied) + final norm; per layer q/k/v/o, gate/up/down,
    input/post-attention norms, q/k/v biases (Qwen2) and q/k norms over head_dim (Qwen3).
    """
    h, hd = arch.hidden_size, arch.head_dim
    total = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) + h
    for d in layers:
        q, kv, inter = d.heads[1] * hd, d.kv_heads[1] * hd, d.intermediate[1]
        total += h * q + h * kv + h * kv + q * h  # q, k, v, o
        total += 3 * h * inter  # gate, up, down
        total += 2 * h  # two RMSNorms
        if qkv_bias:
            total += q + 2 * kv
        if qk_norm:
            total += 2 * hd
    return total


def _arch(**over) -> ArchSpec:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 16,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 100,
        "vocab_size": 32,
    }
    cfg.update(over)
    return ArchSpec.from_config(cfg)


def _config(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- exact ratio


@pytest.mark.parametrize("ratio", RATIOS + [0.0, 0.30000000000000004, 1 / 3, 0.123456789])
def test_exact_ratio_is_the_shortest_decimal(ratio):
    r = exact_ratio(ratio)
    assert isinstance(r, Fraction)
    assert r == Fraction(_dec(ratio))  # the decimal the user wrote...
    assert exact_ratio(repr(ratio)) == r  # ...whether given as float or string
    if r != Fraction(ratio):  # ...not the binary float's exact value
        assert Fraction(ratio) != r


def test_exact_ratio_examples():
    assert exact_ratio(0.85) == Fraction(17, 20)
    assert exact_ratio(0.55) == Fraction(11, 20)
    assert Fraction(0.55) > Fraction(11, 20)  # the binary float is slightly above: ceil would be wrong
    assert exact_ratio("0.65") == Fraction(13, 20)


@pytest.mark.parametrize("bad", [1.0, 1, -0.01, 1.5, "1.0", "-0.5", float("inf"), float("nan"), "abc", "1/0"])
def test_exact_ratio_refuses_out_of_range(bad):
    with pytest.raises(LoramError, match="ratio"):
        exact_ratio(bad)


# ----------------------------------------------------------------------------- kept_units


@pytest.mark.parametrize("ratio", RATIOS + [0.0])
def test_kept_units_matches_decimal_oracle_on_a_grid(ratio):
    r = exact_ratio(ratio)
    for total in range(1, 257):
        assert kept_units(total, r, "kv_groups") == oracle_kv_groups(total, ratio), (total, ratio)
        assert kept_units(total, r, "heads") == oracle_mha_heads(total, ratio), (total, ratio)
    for total in list(range(1, 600)) + [4864, 5632, 11008, 13824, 14336, 18944, 28672]:
        assert kept_units(total, r, "channels") == oracle_channels(total, ratio), (total, ratio)


# (total, ratio, kind, paper answer, what naive binary-float math gives)
FLOAT_TRAPS = [
    (100, 0.55, "channels", 45, 100 - math.ceil(100 * 0.55)),  # 100*0.55 = 55.00000000000001 -> ceil 56
    (20, 0.9, "heads", 2, math.floor(20 * (1 - 0.9))),  # 1-0.9 = 0.09999999999999998 -> 1.99.. -> 1
    (90, 0.3, "heads", 63, math.floor(90 * (1 - 0.3))),  # 1-0.3 = 0.7 (binary) -> 62.99.. -> 62
    (90, 0.7, "kv_groups", 27, 90 - math.floor(90 * 0.7)),  # 90*0.7 = 62.99.. -> floor 62 -> 28
    (180, 0.55, "channels", 81, 180 - math.ceil(180 * 0.55)),
]


@pytest.mark.parametrize("total,ratio,kind,paper,naive", FLOAT_TRAPS)
def test_kept_units_exact_where_binary_floats_round_wrong(total, ratio, kind, paper, naive):
    assert naive != paper  # the case really is a trap for float math
    # also a trap for "exact" math on the binary value (Fraction(float) / Decimal(float))
    assert kept_units(total, exact_ratio(ratio), kind) == paper
    assert kept_units(total, exact_ratio(str(ratio)), kind) == paper


def test_kept_units_binary_exact_value_would_also_be_wrong():
    # Fraction(0.55) is the float's true binary value, 0.55000000000000004440...: still wrong.
    assert max(1, 100 - math.ceil(100 * Fraction(0.55))) == 44
    assert kept_units(100, exact_ratio(0.55), "channels") == 45


@pytest.mark.parametrize(
    "total,ratio,kind",
    [
        (1, 0.99, "kv_groups"),
        (2, 0.99, "kv_groups"),
        (8, 0.95, "heads"),
        (3, 0.9, "channels"),
        (1, 0.5, "channels"),
        (1, 0.5, "heads"),
    ],
)
def test_kept_units_never_below_one(total, ratio, kind):
    assert kept_units(total, exact_ratio(ratio), kind) == 1


def test_kept_units_unknown_kind():
    with pytest.raises(ValueError):
        kept_units(8, Fraction(1, 2), "rows")


# ----------------------------------------------------------------------------- keep_first / keep_last


@pytest.mark.parametrize("num_layers", list(range(1, 41)) + [80, 126])
def test_layers_kept_intact_defaults(num_layers):
    assert layers_kept_intact(num_layers, None, None) == oracle_intact(num_layers)


def test_layers_kept_intact_documented_examples():
    assert layers_kept_intact(8, None, None) == (2, 1)
    assert layers_kept_intact(16, None, None) == (4, 2)
    assert layers_kept_intact(80, None, None) == (4, 2)
    assert layers_kept_intact(8, 3, None) == (3, 1)  # explicit first, default last
    assert layers_kept_intact(8, None, 0) == (2, 0)
    assert layers_kept_intact(8, 0, 0) == (0, 0)
    assert layers_kept_intact(8, 5, 3) == (5, 3)  # first + last == L: allowed, nothing eligible


@pytest.mark.parametrize("first,last", [(5, 4), (9, 0), (0, 9), (-1, 0), (0, -1), (None, 8)])
def test_layers_kept_intact_refuses_what_does_not_fit(first, last):
    with pytest.raises(LoramError, match="do not fit"):
        layers_kept_intact(8, first, last)


def test_plan_layers_refuses_bad_keep():
    with pytest.raises(LoramError):
        plan_layers(_arch(num_hidden_layers=8), 0.5, 6, 3)


# ----------------------------------------------------------------------------- plan_layers


ARCHS = {
    "mha": dict(num_attention_heads=8, num_key_value_heads=8, intermediate_size=172),
    "gqa4": dict(num_attention_heads=16, num_key_value_heads=4, intermediate_size=172, head_dim=16),
    "gqa3": dict(num_attention_heads=12, num_key_value_heads=4, intermediate_size=260, hidden_size=96),
    "mqa": dict(num_attention_heads=8, num_key_value_heads=1, intermediate_size=33),
    "odd": dict(num_attention_heads=6, num_key_value_heads=6, intermediate_size=7, hidden_size=48),
}


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("num_layers", [1, 3, 8, 16, 24])
@pytest.mark.parametrize("keep", [(None, None), (0, 0), (1, 2)])
def test_plan_layers_properties(name, num_layers, keep):
    arch = _arch(num_hidden_layers=num_layers, **ARCHS[name])
    H, Hkv, I, G = arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size, arch.group_size
    if keep == (1, 2) and num_layers < 3:
        with pytest.raises(LoramError):
            plan_layers(arch, 0.5, *keep)
        return
    want_first, want_last = oracle_intact(num_layers) if keep == (None, None) else keep
    for ratio in (0.0, 0.1, 0.5, 0.65, 0.85, 0.99):
        layers, used = plan_layers(arch, ratio, *keep)
        assert used == (want_first, want_last)
        assert [d.index for d in layers] == list(range(num_layers))
        for d in layers:
            eligible = ratio > 0 and want_first <= d.index < num_layers - want_last
            assert d.heads[0] == H and d.kv_heads[0] == Hkv and d.intermediate[0] == I
            if not eligible:
                assert (d.heads[1], d.kv_heads[1], d.intermediate[1]) == (H, Hkv, I), d
                assert not d.pruned
                continue
            if arch.is_gqa:
                assert d.kv_heads[1] == oracle_kv_groups(Hkv, ratio)
                assert d.heads[1] == d.kv_heads[1] * G  # whole KV groups: G stays the same
            else:
                assert d.heads[1] == d.kv_heads[1] == oracle_mha_heads(H, ratio)
            assert d.intermediate[1] == oracle_channels(I, ratio)
            assert 1 <= d.kv_heads[1] <= Hkv and 1 <= d.intermediate[1] <= I
            # spec 3.3: pruned iff some kept < original
            assert d.pruned == (d.heads[1] < H or d.kv_heads[1] < Hkv or d.intermediate[1] < I), d


def test_plan_layers_pruned_flag_when_nothing_can_be_removed():
    # MQA (one kv head) with a single MLP channel: an eligible layer keeps everything at
    # any ratio, so it is not "pruned" (spec 3.3: pruned iff some kept < original).
    arch = _arch(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=1, intermediate_size=1)
    layers, _ = plan_layers(arch, 0.5, 0, 0)
    for d in layers:
        assert (d.kv_heads[1], d.intermediate[1]) == (1, 1)
        assert not d.pruned, d


def test_plan_layers_low_ratio_keeps_all_kv_groups_but_prunes_mlp():
    arch = _arch(num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, intermediate_size=172)
    layers, _ = plan_layers(arch, 0.2)
    d = layers[4]
    assert d.pruned and d.kv_heads == (4, 4) and d.heads == (16, 16) and d.intermediate == (172, 137)


def test_plan_layers_ratio_float_and_string_agree():
    arch = _arch(num_hidden_layers=16, num_attention_heads=20, num_key_value_heads=20, intermediate_size=100)
    a, _ = plan_layers(arch, 0.9)
    b, _ = plan_layers(arch, "0.9")
    assert a == b
    assert a[4].heads == (20, 2)  # not 1: 1 - 0.9 is 0.0999.. in binary


def test_layer_dims_json_roundtrip():
    arch = _arch(num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, intermediate_size=172)
    layers, _ = plan_layers(arch, 0.75)
    for d in layers:
        j = d.to_json()
        assert j["index"] == d.index and j["pruned"] == d.pruned
        assert j["num_key_value_heads"] == {"original": d.kv_heads[0], "kept": d.kv_heads[1]}
        assert LayerDims.from_json(json.loads(json.dumps(j))) == d


# ----------------------------------------------------------------------------- paper numbers


def test_paper_llama31_70b_at_085():
    arch = ArchSpec.from_config(_config("llama-3.1-70b"))
    layers, used = plan_layers(arch, 0.85, 4, 2)
    assert used == (4, 2)
    assert [d.index for d in layers if d.pruned] == list(range(4, 78))
    for d in layers[4:78]:
        assert d.kv_heads == (8, 2) and d.heads == (64, 16) and d.intermediate == (28672, 4300)
    original, _ = plan_layers(arch, 0.0)
    assert count_params(arch, original, qkv_bias=False, qk_norm=False) == 70_553_706_496
    assert count_params(arch, layers, qkv_bias=False, qk_norm=False) == 17_849_982_976
    # defaults are the paper's 4 and 2 for an 80-layer model
    assert plan_layers(arch, 0.85)[0] == layers


def test_paper_llama31_70b_ratio_1581():
    arch = ArchSpec.from_config(_config("llama-3.1-70b"))
    o = count_params(arch, plan_layers(arch, 0.0)[0], qkv_bias=False, qk_norm=False)
    p = count_params(arch, plan_layers(arch, 0.85)[0], qkv_bias=False, qk_norm=False)
    assert f"{o / (p / 4):.2f}" == "15.81"


def test_paper_llama2_13b_at_065():
    arch = ArchSpec.from_config(_config("llama-2-13b"))
    assert not arch.is_gqa
    layers, used = plan_layers(arch, 0.65)
    assert used == (4, 2)
    for d in layers[4:38]:
        assert d.heads == (40, 14) and d.kv_heads == (40, 14) and d.intermediate == (13824, 4838)
    o = count_params(arch, plan_layers(arch, 0.0)[0], qkv_bias=False, qk_norm=False)
    p = count_params(arch, layers, qkv_bias=False, qk_norm=False)
    assert o == 13_015_864_320
    assert f"{o / p:.2f}" == "2.17"


@pytest.mark.parametrize("ratio,expected", [(0.85, "16.95"), (0.75, "12.84")])
def test_paper_llama2_70b_qloram_ratio(ratio, expected):
    arch = ArchSpec.from_config(_config("llama-2-70b"))
    o = count_params(arch, plan_layers(arch, 0.0)[0], qkv_bias=False, qk_norm=False)
    p = count_params(arch, plan_layers(arch, ratio)[0], qkv_bias=False, qk_norm=False)
    assert o == 68_976_648_192
    assert f"{o / (p / 4):.2f}" == expected


# ----------------------------------------------------------------------------- the count itself


REF = {  # name -> (qkv_bias, qk_norm)
    "llama-3.1-70b": (False, False),
    "llama-2-13b": (False, False),
    "llama-3.2-1b": (False, False),
    "mistral-7b-v0.1": (False, False),
    "qwen2.5-7b": (True, False),
    "qwen3-8b": (False, True),
}


@pytest.mark.parametrize("name", list(REF))
def test_independent_count_matches_transformers(name):
    """The test's own count equals what transformers builds from the real config (meta device)."""
    import transformers

    cfg = _config(name)
    arch = ArchSpec.from_config(cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    qkv_bias, qk_norm = REF[name]
    assert count_params(arch, plan_layers(arch, 0.0)[0], qkv_bias=qkv_bias, qk_norm=qk_norm) == model.num_parameters()


@pytest.mark.parametrize("name", list(REF))
def test_package_count_parameters_agrees(name):
    from loramkit.families.geometry import count_parameters

    arch = ArchSpec.from_config(_config(name))
    qkv_bias, qk_norm = REF[name]
    for ratio in (0.0, 0.5, 0.65, 0.75, 0.85):
        layers, _ = plan_layers(arch, ratio)
        assert count_parameters(arch, layers) == count_params(arch, layers, qkv_bias=qkv_bias, qk_norm=qk_norm)


def test_package_count_parameters_paper_numbers():
    from loramkit.families.geometry import count_parameters

    arch = ArchSpec.from_config(_config("llama-3.1-70b"))
    assert count_parameters(arch, plan_layers(arch, 0.0)[0]) == 70_553_706_496
    assert count_parameters(arch, plan_layers(arch, 0.85)[0]) == 17_849_982_976
