"""The families added after LLaMA/Mistral/Qwen: Gemma 2, Gemma 3 (text), Phi-3 and Qwen3-MoE.

What the parametrized suites (prune, load, recover, merge, quantize, validate) do not say:
- reference configs: loramkit's parameter count equals transformers' own model built from
  the published config (on the meta device), and the published totals; `loramkit plan` works;
- Phi-3's fused projections against an independent oracle: the same weights split into a
  Mistral model (separate q/k/v and gate/up, same sliding window) compute the same logits,
  and pruning either one keeps the same units for every importance;
- train -> eval -> recover -> eval on the base -> merge end to end on each new family, through the CLI;
- Qwen3-MoE (experts): bundles, loading, importance per expert channel, LoRA on experts
  (PEFT target_parameters), recovery, merge, align and 4-bit quantization.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramkit.cli import run
from loramkit.families import ArchSpec
from loramkit.families.geometry import count_parameters
from loramkit.families.pruning_rules import plan_layers
from loramkit.model.loader import load_pruned_model
from loramkit.prune.pruner import prune
from tests.factory import VOCAB_SIZE, sample_texts, tiny_tokenizer
from tests.lora_helpers import ids, load_base, peft_on_base, read_adapter
from tests.tolerance import assert_close_eps

DATA = Path(__file__).parent / "data"

# name -> (published total in billions, as the model cards round it; where the card counts
# more than the text model, the technical report's non-embedding count in millions instead).
PUBLISHED = {
    "gemma-2-9b": ("total_b", 9.24),
    "gemma-3-12b-text": ("non_embedding_m", 10_759),  # Gemma 3 report, table 1 (the card's 12.2B has the vision tower)
    "phi-3-mini-4k": ("total_b", 3.82),
    "phi-3-medium-4k": ("total_b", 13.96),
}


def _transformers_count(config: dict) -> int:
    """Parameters of transformers' own model for ``config``, built on the meta device (tied counted once)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_reference_config_counts(name, capsys):
    config = json.loads((DATA / f"{name}.json").read_text())
    arch = ArchSpec.from_config(config)
    full = count_parameters(arch, plan_layers(arch, 0.0)[0])
    assert full == _transformers_count(config)
    kind, published = PUBLISHED[name]
    if kind == "total_b":
        assert round(full / 1e9, 2) == published
    else:
        assert round((full - arch.vocab_size * arch.hidden_size) / 1e6) == published
    pruned = count_parameters(arch, plan_layers(arch, 0.5)[0])
    assert pruned < full
    assert run(["plan", str(DATA / f"{name}.json"), "--ratio", "0.5", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["original_parameters"], p["pruned_parameters"]) == (full, pruned)


# ----------------------------------------------------------------------------- Phi-3 as Mistral


def _phi3_as_mistral(phi3_dir: Path, out: Path) -> Path:
    """The Phi-3 base rewritten as a Mistral checkpoint: qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj.

    The split follows transformers' Phi3Attention ([Q | K | V] rows) and Phi3MLP (chunk(2): gate first).
    """
    cfg = json.loads((phi3_dir / "config.json").read_text())
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, inter = hidden // heads, cfg["intermediate_size"]
    tensors = load_file(str(phi3_dir / "model.safetensors"))
    split: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".qkv_proj." in name:
            q, k, v = t.split([heads * hd, kv * hd, kv * hd])
            for part, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                split[name.replace("qkv_proj", part)] = w.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = t.split([inter, inter])
            split[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            split[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            split[name] = t
    out.mkdir(parents=True)
    save_file(split, str(out / "model.safetensors"), metadata={"format": "pt"})
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "sliding_window",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "initializer_range", "torch_dtype")  # fmt: skip
    mistral = {k: cfg[k] for k in keep if k in cfg} | {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": cfg["hidden_act"],
    }
    (out / "config.json").write_text(json.dumps(mistral))
    tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def phi3_pair(make_base_dir, tmp_path_factory) -> tuple[Path, Path]:
    phi3 = make_base_dir("phi3")
    return phi3, _phi3_as_mistral(phi3, tmp_path_factory.mktemp("as_mistral") / "base")


def test_phi3_split_into_mistral_computes_the_same(phi3_pair):
    phi3, mistral = phi3_pair
    x = ids(3, 24)  # longer than the sliding window (12)
    with torch.no_grad():
        a = load_base(phi3, torch.float64)(x).logits
        b = load_base(mistral, torch.float64)(x).logits
    assert_close_eps(b, a, 2**6, torch.float64, "Phi-3 vs its Mistral split:")


@pytest.mark.parametrize("importance", ["random", "magnitude", "taylor", "activation"])
def test_phi3_keeps_what_its_mistral_split_keeps(phi3_pair, tmp_path, importance):
    """Same units for every importance, and the pruned models compute the same (fused segments sliced right)."""
    phi3, mistral = phi3_pair
    kw: dict = dict(importance=importance, show_progress=False, seed=4)
    if importance in ("taylor", "activation"):
        calib = tmp_path / "calib.txt"
        calib.write_text("\n\n".join(sample_texts(24, seed=9)))
        kw |= dict(calibration=calib, calibration_samples=4, calibration_seq_len=32)
    prune(phi3, tmp_path / "p", 0.5, **kw)
    prune(mistral, tmp_path / "m", 0.5, **kw)
    maps_p = load_file(str(tmp_path / "p" / "kept_indices.safetensors"))
    maps_m = load_file(str(tmp_path / "m" / "kept_indices.safetensors"))
    assert maps_p and {k for k in maps_p if "o_proj" in k or "down_proj" in k} == {
        k for k in maps_m if "o_proj" in k or "down_proj" in k
    }
    for key, kept in maps_p.items():
        if key.endswith(":1"):  # o_proj / down_proj columns: the kept groups and channels themselves
            assert torch.equal(kept, maps_m[key]), key
    x = ids(3, 24)
    with torch.no_grad():
        a = load_pruned_model(tmp_path / "p", dtype=torch.float64)(x).logits
        b = load_pruned_model(tmp_path / "m", dtype=torch.float64)(x).logits
    assert_close_eps(b, a, 2**6, torch.float64, "pruned Phi-3 vs pruned Mistral split:")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "phi3"])
def test_train_recover_merge_end_to_end(make_base_dir, tmp_path, case):
    base = make_base_dir(case)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(sample_texts(48, seed=2)))
    b, adapter, rec, merged = (tmp_path / n for n in ("bundle", "adapter", "recovered", "merged"))
    assert run(["prune", str(base), "--out", str(b), "--ratio", "0.5", "--importance", "magnitude"]) == 0
    assert run(["validate", str(b)]) == 0
    assert run(["train", str(b), "--data", str(data), "--out", str(adapter), "--max-steps", "3", "--rank", "4",
                "--seq-len", "32", "--micro-batch", "4", "--lr", "1e-2", "--precision", "fp32"]) == 0  # fmt: skip
    cfg, small = read_adapter(adapter)
    targets = (
        {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        if case == "phi3"
        else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert set(cfg["target_modules"]) == targets
    assert run(["eval", str(b), "--data", str(data), "--adapter", str(adapter), "--seq-len", "32", "--precision", "fp32"]) == 0
    assert run(["recover", str(adapter), "--bundle", str(b), "--out", str(rec)]) == 0
    assert run(["eval", str(base), "--data", str(data), "--adapter", str(rec), "--seq-len", "32", "--precision", "fp32"]) == 0
    assert run(["recover", str(adapter), "--bundle", str(b), "--out", str(tmp_path / "r2"), "--merge", "--base", str(base),
                "--merged-out", str(merged)]) == 0  # fmt: skip
    model = peft_on_base(base, rec)  # strict: no missing or unexpected keys, no warnings
    x = ids(2, 20, VOCAB_SIZE)
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
        merged_logits = load_base(merged)(x).logits
    assert (adapted - plain).abs().max() > 1e-4, "training changed nothing"
    assert_close_eps(merged_logits, adapted, 2**8, torch.float32, "merged vs PeftModel(base, recovered):")


# ----------------------------------------------------------------------------- Qwen3-MoE

MOE = "qwen3_moe"
E, I_MOE = 4, 48  # tests/factory.py's qwen3_moe case


def test_moe_reference_config_counts(capsys):
    """qwen3-30b-a3b: 30.5B parameters (the model card), as transformers' own model counts them."""
    config = json.loads((DATA / "qwen3-30b-a3b.json").read_text())
    arch = ArchSpec.from_config(config)
    full = count_parameters(arch, plan_layers(arch, 0.0)[0])
    assert (arch.num_experts, arch.intermediate_size) == (128, 768)
    assert full == _transformers_count(config) and round(full / 1e9, 2) == 30.53
    assert run(["plan", str(DATA / "qwen3-30b-a3b.json"), "--ratio", "0.5", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["original_parameters"] == full and p["pruned_parameters"] == count_parameters(arch, plan_layers(arch, 0.5)[0])


@pytest.fixture(scope="module")
def moe(make_base_dir, tmp_path_factory) -> dict[str, Path]:
    base = make_base_dir(MOE)
    out = {"base": base}
    for importance in ("magnitude", "random"):
        out[importance] = tmp_path_factory.mktemp("moe") / importance
        prune(base, out[importance], 0.5, importance=importance, show_progress=False)
    return out


def _expert_maps(bundle: Path, layer: int, tensor: str, dim: int) -> list[torch.Tensor] | None:
    maps = load_file(str(bundle / "kept_indices.safetensors"))
    got = [maps.get(f"model.layers.{layer}.mlp.experts.{e}.{tensor}.weight:{dim}") for e in range(E)]
    return None if got[0] is None else got


def _moe_base64(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64, experts_implementation="eager").eval()


def test_moe_bundle_keeps_each_experts_own_channels(moe):
    from loramkit.bundle.validate import validate

    base = load_file(str(moe["base"] / "model.safetensors"))
    m = json.loads((moe["magnitude"] / "loram.json").read_text())
    pruned = m["pruning"]["pruned_layers"]
    assert pruned and validate(moe["magnitude"]) == ([], [])
    for i in pruned:
        gates = _expert_maps(moe["magnitude"], i, "gate_proj", 0)
        assert gates is not None and all(len(g) == I_MOE // 2 for g in gates)  # the same count in every expert
        for e in range(E):
            assert torch.equal(gates[e], _expert_maps(moe["magnitude"], i, "up_proj", 0)[e])
            assert torch.equal(gates[e], _expert_maps(moe["magnitude"], i, "down_proj", 1)[e])
            # magnitude: the top L2 channels of this expert (gate row, up row, down column)
            w = lambda n: base[f"model.layers.{i}.mlp.experts.{e}.{n}.weight"].double()  # noqa: E731
            score = w("gate_proj").square().sum(1) + w("up_proj").square().sum(1) + w("down_proj").square().sum(0)
            assert gates[e].tolist() == sorted(score.argsort(descending=True)[: I_MOE // 2].tolist())
        assert len({tuple(g.tolist()) for g in gates}) > 1, "every expert keeps its own channels"
        assert f"model.layers.{i}.mlp.gate.weight" not in {
            k.rsplit(":", 1)[0] for k in load_file(str(moe["magnitude"] / "kept_indices.safetensors"))
        }
    assert run(["inspect", str(moe["magnitude"])]) == 0


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_moe_pruned_logits_equal_original_with_pruned_channels_zeroed(moe, importance):
    bundle = moe[importance]
    pruned = load_pruned_model(bundle, dtype=torch.float64)
    pruned.config._experts_implementation = "eager"  # grouped_mm has no float64
    maps = load_file(str(bundle / "kept_indices.safetensors"))

    def zeroed(shift: int):
        model = _moe_base64(moe["base"])
        with torch.no_grad():
            for key, kept in maps.items():
                name, dim = key.rsplit(":", 1)
                if dim != "1":
                    continue
                parts = name.split(".")
                if ".experts." in name:  # expert e's down_proj columns = in-memory down_proj[e] columns
                    w = model.model.layers[int(parts[2])].mlp.experts.down_proj[int(parts[5])]
                    kept = (kept + shift) % I_MOE
                else:
                    w = model.get_parameter(name)
                drop = torch.ones(w.shape[1], dtype=torch.bool)
                drop[kept] = False
                w[:, drop] = 0.0
        return model

    x = ids(3, 20)
    with torch.no_grad():
        got = pruned(x).logits
        want = zeroed(0)(x).logits
        assert_close_eps(got, want, 2**6, torch.float64, "pruned MoE vs zeroed original:")
        assert (got - _moe_base64(moe["base"])(x).logits).abs().max() > 1e-2  # pruning removed something
        assert (got - zeroed(1)(x).logits).abs().max() > 1e-2  # other channels would not do


def _moe_adapter(bundle: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    torch.manual_seed(3)
    get_peft_model(load_pruned_model(bundle), config).save_pretrained(out)
    return out


def _expert_deltas(model) -> dict[tuple[int, str], torch.Tensor]:
    """PEFT's own per-expert delta of each wrapped expert tensor: (layer, param) -> [E, out, in]."""
    from peft.tuners.lora.layer import ParamWrapper

    return {(int(n.split(".")[4]), m.parameter_name): m.get_delta_weight("default").detach()
            for n, m in model.named_modules() if isinstance(m, ParamWrapper)}  # fmt: skip


def test_moe_recovered_adapter_is_exact_loads_and_merges(moe, tmp_path):
    from peft import PeftModel

    from loramkit import Bundle
    from loramkit.recover.adapter import recover_adapter
    from loramkit.recover.merge import merge_adapter

    bundle, base = moe["magnitude"], moe["base"]
    adapter = _moe_adapter(bundle, tmp_path / "adapter")
    recover_adapter(adapter, tmp_path / "rec", bundle)
    cfg, full = read_adapter(tmp_path / "rec")
    assert cfg["target_parameters"] and any(".experts.base_layer.lora_B" in k for k in full)

    model = peft_on_base(base, tmp_path / "rec")  # strict: no missing or unexpected keys, no warnings
    small = PeftModel.from_pretrained(load_pruned_model(bundle), adapter)
    got, want = _expert_deltas(model), _expert_deltas(small)
    assert set(got) == set(want) and len(got) == 2 * 8
    pruned_layers = json.loads((bundle / "loram.json").read_text())["pruning"]["pruned_layers"]
    for (layer, param), delta in got.items():
        if layer not in pruned_layers:
            assert torch.equal(delta, want[(layer, param)])
            continue
        if param == "gate_up_proj":  # [E, 2I, H]: each expert's kept gate and up rows
            kept = [
                torch.cat([g, I_MOE + u])
                for g, u in zip(_expert_maps(bundle, layer, "gate_proj", 0), _expert_maps(bundle, layer, "up_proj", 0))
            ]
            dim = 0
        else:  # [E, H, I]: each expert's kept down columns
            kept, dim = _expert_maps(bundle, layer, "down_proj", 1), 1
        for e in range(E):
            rest = torch.ones(delta.shape[1 + dim], dtype=torch.bool)
            rest[kept[e]] = False
            # The adapters' tensors are equal bit for bit (read_adapter above); their products B @ A
            # differ only by how the kernel blocks a wider matrix: a sum of r terms, a few eps.
            assert_close_eps(delta[e].index_select(dim, kept[e]), want[(layer, param)][e], 16, msg=f"{layer} {param} {e}")
            assert not delta[e].index_select(dim, rest.nonzero()[:, 0]).any(), (layer, param, e)

    merge_adapter(base, tmp_path / "rec", tmp_path / "merged", bundle=Bundle(bundle), show_progress=False)
    x = ids(2, 20)
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
        merged = load_base(tmp_path / "merged")(x).logits
    assert (adapted - plain).abs().max() > 1e-3
    assert_close_eps(merged, adapted, 2**8, torch.float32, "merged MoE vs PeftModel(base, recovered):")


def test_moe_train_recover_end_to_end_and_4bit(moe, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(sample_texts(48, seed=2)))
    b, adapter, rec = moe["magnitude"], tmp_path / "adapter", tmp_path / "recovered"
    assert run(["train", str(b), "--data", str(data), "--out", str(adapter), "--max-steps", "2", "--rank", "4",
                "--seq-len", "32", "--micro-batch", "4", "--lr", "1e-2", "--precision", "fp32"]) == 0  # fmt: skip
    cfg, _ = read_adapter(adapter)
    assert cfg["target_parameters"] and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert run(["eval", str(b), "--data", str(data), "--adapter", str(adapter), "--seq-len", "32", "--precision", "fp32"]) == 0
    assert run(["recover", str(adapter), "--bundle", str(b), "--out", str(rec)]) == 0
    peft_on_base(moe["base"], rec)
    assert (
        run(["eval", str(moe["base"]), "--data", str(data), "--adapter", str(rec), "--seq-len", "32", "--precision", "fp32"]) == 0
    )
    q = tmp_path / "q"
    assert run(["quantize", str(b), "--out", str(q)]) == 0
    assert run(["validate", str(q)]) == 0
    model = load_pruned_model(q)
    with torch.no_grad():
        assert torch.isfinite(model(ids(2, 12)).logits).all()


@pytest.mark.parametrize("case", ["qwen3_moe", "phi3", "gemma3"])
def test_align_writes_a_bundle_in_the_stored_layout(make_base_dir, tmp_path, case):
    """Full-parameter alignment: every trained weight (an expert's slice of a fused tensor too) back under its stored name."""
    from loramkit.bundle.validate import validate
    from loramkit.train.align import align
    from loramkit.train.config import AlignConfig

    b = tmp_path / "b"
    prune(make_base_dir(case), b, 0.5, importance="random", show_progress=False)
    data = tmp_path / "c.txt"
    data.write_text("\n\n".join(sample_texts(60, seed=5)))
    cfg = AlignConfig(lr=1e-2, micro_batch=4, seq_len=32, max_steps=2, precision="fp32", eval_split=0.1)
    align(b, data, tmp_path / "a", cfg, show_progress=False, log=lambda m: None)
    assert validate(tmp_path / "a") == ([], [])
    before, after = load_file(str(b / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in before if ".layers.3." in n} <= changed  # every weight of a pruned layer trained, experts included
    with torch.no_grad():
        assert torch.isfinite(load_pruned_model(tmp_path / "a")(ids(2, 12)).logits).all()


def test_moe_taylor_scores_each_experts_channels_as_float64_autograd(moe, tmp_path):
    """The layer-streamed engine's Taylor scores of a mixture, against one float64 backward of the whole model
    (float64 but for the router's float32 softmax).

    Reference: |w * dL/dw| of transformers' fused expert tensors, summed here over each
    expert's gate row, up row (gate_up_proj [E, 2I, H]) and down column (down_proj [E, H, I]).
    """
    from loramkit.prune.calibration import EngineSettings, calibrated_scores, load_calibration
    from loramkit.prune.taylor import whole_model_taylor_scores

    base = moe["base"]
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("\n\n".join(sample_texts(40, seed=5)))
    calib = load_calibration(calib_file, base, 256, 5, 24)
    arch = ArchSpec.from_config(json.loads((base / "config.json").read_text()))
    layers = [2, 3, 4, 5, 6]
    got = calibrated_scores(
        base, arch, layers, calib, "taylor", EngineSettings(micro_batch=2, dtype=torch.float64, show_progress=False)
    )

    reference = whole_model_taylor_scores(base, arch, layers, calib)  # the package's whole-model path, float32
    model = _moe_base64(base)
    model(input_ids=calib.ids, labels=calib.ids).loss.backward()  # mean next-token loss over every block
    for i in layers:
        experts = model.model.layers[i].mlp.experts
        gu = (experts.gate_up_proj * experts.gate_up_proj.grad).abs()  # (E, 2I, H)
        down = (experts.down_proj * experts.down_proj.grad).abs()  # (E, H, I)
        want = (gu[:, :I_MOE].sum(2) + gu[:, I_MOE:].sum(2) + down.sum(1)).detach()  # (E, I)
        ch = got[i][1]
        assert ch.shape == (E, I_MOE)
        # transformers' router takes its softmax in float32 even in a float64 model, so gradients
        # through routing carry float32 rounding, summed in another order per micro-batch split.
        assert_close_eps(ch, want, 2**4, torch.float32, f"layer {i} expert channel scores:")
        assert_close_eps(reference[i][1].double(), want, 2**10, torch.float32, f"layer {i} whole-model reference (float32):")

    prune(base, tmp_path / "b", 0.5, importance="taylor", calibration=calib_file, calibration_samples=5,
          calibration_seq_len=24, show_progress=False)  # fmt: skip
    for i in layers:
        kept = _expert_maps(tmp_path / "b", i, "down_proj", 1)
        for e in range(E):  # float32 scores: compare where the float64 ranking has a clear margin
            order = got[i][1][e].argsort(descending=True)
            top, rest = order[: I_MOE // 2], order[I_MOE // 2 :]
            if got[i][1][e][top].min() > 1.001 * got[i][1][e][rest].max():
                assert kept[e].tolist() == sorted(top.tolist()), (i, e)


def test_moe_activation_scores_each_experts_routed_tokens(moe, tmp_path):
    """Minitron's channel activation per expert: |act(gate) * up| over the tokens routed to it, / all tokens.

    Reference: a float64 eager model whose experts' inputs (hidden states, routed experts) are
    captured, and each expert's MLP recomputed here from the stored per-expert weights.
    """
    from loramkit.prune.calibration import EngineSettings, calibrated_scores, load_calibration

    base = moe["base"]
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("\n\n".join(sample_texts(40, seed=5)))
    calib = load_calibration(calib_file, base, 256, 5, 24)
    arch = ArchSpec.from_config(json.loads((base / "config.json").read_text()))
    layers = [2, 4, 6]
    got = calibrated_scores(
        base, arch, layers, calib, "activation", EngineSettings(micro_batch=2, dtype=torch.float64, show_progress=False)
    )

    stored = load_file(str(base / "model.safetensors"))
    model = _moe_base64(base)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in layers:
        model.model.layers[i].mlp.experts.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, (a[0], a[1])))
    with torch.no_grad():
        model(input_ids=calib.ids)
    for i in layers:
        x, routed = seen[i]  # (tokens, H), (tokens, top_k)
        want = torch.zeros(E, I_MOE, dtype=torch.float64)
        for e in range(E):
            w = lambda n: stored[f"model.layers.{i}.mlp.experts.{e}.{n}.weight"].double()  # noqa: E731
            xe = x[(routed == e).any(-1)]
            want[e] = (torch.nn.functional.silu(xe @ w("gate_proj").T) * (xe @ w("up_proj").T)).abs().sum(0) / calib.ids.numel()
        assert got[i][1].shape == (E, I_MOE)
        assert_close_eps(got[i][1], want, 2**6, torch.float64, f"layer {i} expert channel activations:")
    prune(base, tmp_path / "b", 0.5, importance="activation", calibration=calib_file, calibration_samples=5,
          calibration_seq_len=24, show_progress=False)  # fmt: skip
    from loramkit.bundle.validate import validate

    assert validate(tmp_path / "b") == ([], [])
