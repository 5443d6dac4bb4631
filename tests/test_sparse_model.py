"""Sparse bundles in memory and in training (issue 11, items 4 and 6): loramkit.model.sparse.

Key property: a sparse bundle's model IS the base model with the pruned weights set to zero.
Its compressed Linears compute what a dense zero-filled Linear computes (logits, LoRA
gradients, gradients of the kept weights), PEFT puts the same LoRA on them as on the dense
model, and nothing dense of a compressed weight lives between calls (not in the module, not
in what autograd saves). ``align`` trains the kept values only, so the pattern cannot move.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from loramkit.bundle import Bundle
from loramkit.bundle.sparse import mask_key, unpack_mask, values_key
from loramkit.errors import LoramError
from loramkit.model.loader import load_pruned_model
from loramkit.model.sparse import SparseLinear, densify
from loramkit.prune.pruner import prune
from loramkit.train.setup import enable_activation_checkpointing
from tests.factory import sample_texts
from tests.lora_helpers import TARGETS, targets_of
from tests.test_loader import inputs  # 3 x 20 seeded ids, one row right-padded
from tests.tolerance import assert_close_eps

CASE = "llama_gqa"
VARIANTS = {  # the two sparse strategies, magnitude importance (kept values are the base's, bitwise)
    "unstructured": dict(ratio=0.5, strategy="unstructured", keep_first=1, keep_last=1),
    "2:4": dict(ratio=None, strategy="semi-structured", pattern="2:4", keep_first=1, keep_last=1),
}


# ============================================================================ helpers


@pytest.fixture(scope="module")
def sparse_bundle(make_base_dir, tmp_path_factory):
    """(base dir, sparse bundle) per variant and base dtype, pruned once per module."""
    cache: dict[tuple[str, torch.dtype], tuple[Path, Path]] = {}

    def _make(variant: str = "unstructured", dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
        if (variant, dtype) not in cache:
            base = make_base_dir(CASE, dtype=dtype)
            out = tmp_path_factory.mktemp("sparse") / variant.replace(":", "-")
            prune(base, out, importance="magnitude", show_progress=False, **VARIANTS[variant])
            cache[variant, dtype] = base, out
        return cache[variant, dtype]

    return _make


def stored_tensor(bundle: Path, name: str) -> torch.Tensor:
    b = Bundle(bundle)
    with b.weights() as ckpt:
        return ckpt.get(name)


def masks_of(bundle: Path) -> dict[str, torch.Tensor]:
    """Module path -> bool [out, in] kept positions, from the stored packed masks."""
    b = Bundle(bundle)
    out = {}
    with b.weights() as ckpt:
        for module in b.sparsity["modules"]:
            cols = b.base["tensors"][f"{module}.weight"]["shape"][1]
            out[module] = unpack_mask(ckpt.get(mask_key(module)), cols)
    return out


def zero_filled_base(base: Path, bundle: Path, dtype: torch.dtype) -> nn.Module:
    """The ORIGINAL model with every weight the bundle pruned set to zero (the paper's model)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    with torch.no_grad():
        for module, mask in masks_of(bundle).items():
            model.get_submodule(module).weight[~mask] = 0
    return model


def lora(model: nn.Module, seed: int = 0) -> nn.Module:
    """Standard LoRA on the seven projections, random non-zero A and B (so every gradient is non-trivial)."""
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))


def loss_grads(model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the LM loss on ``x`` of every parameter that requires one."""
    model.zero_grad(set_to_none=True)
    model(**x, labels=x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ============================================================================ the module


@pytest.mark.parametrize("shape, bias", [((6, 20), True), ((16, 8), False), ((5, 13), True)])  # 13: a padded last byte
def test_sparse_linear_is_a_dense_zero_filled_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.4
    b = torch.randn(shape[0], dtype=torch.float64, generator=gen) if bias else None
    sparse = SparseLinear.from_dense(w, mask, b)
    dense = nn.Linear(shape[1], shape[0], bias=bias, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(w * mask)
        if bias:
            dense.bias.copy_(b)
    assert isinstance(sparse, nn.Linear) and (sparse.in_features, sparse.out_features) == (shape[1], shape[0])
    assert tuple(sparse.weight.shape) == shape and sparse.weight.dtype == torch.float64 and sparse.weight.nnz == int(mask.sum())
    assert torch.equal(sparse.dense_weight(), w * mask)
    sparse.weight.values.requires_grad_(True)
    x = torch.randn(3, 4, shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ys, yd = sparse(x), dense(x2)
    assert_close_eps(ys, yd, 16)
    g = torch.randn(ys.shape, dtype=torch.float64, generator=gen)
    ys.backward(g)
    yd.backward(g)
    assert_close_eps(x.grad, x2.grad, 16)
    assert_close_eps(sparse.weight.values.grad, dense.weight.grad[mask], 16)  # the kept positions' gradients
    if bias:
        assert_close_eps(sparse.bias.grad, dense.bias.grad, 16)


@pytest.mark.parametrize("piece", [1, 7, 64, 1 << 18])  # weights per unpacked piece: a row, rows, all at once
def test_expand_in_pieces_is_the_zero_filled_weight(monkeypatch, piece):
    """The hot path unpacks a few rows at a time; every split gives the one dense weight (any dtype asked)."""
    from loramkit.bundle import sparse as layout

    monkeypatch.setattr(layout, "_EXPAND_PIECE", piece)
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 5), (9, 13), (33, 16), (5, 200)]:
        w, mask = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) > 0.4
        packed, values = layout.compress(w, mask)
        assert torch.equal(layout.expand(packed, values, shape), torch.where(mask, w, 0)), shape
        assert torch.equal(layout.expand(packed, values, shape, torch.bfloat16), torch.where(mask, w, 0).bfloat16()), shape


def test_sparse_linear_under_autocast_does_the_casts_of_a_dense_linear():
    """bf16 autocast over fp32 values: the output, input and value gradients of a zero-filled nn.Linear."""
    gen = torch.Generator().manual_seed(1)
    w, mask = torch.randn(24, 40, generator=gen), torch.rand(24, 40, generator=gen) > 0.5
    sparse = SparseLinear.from_dense(w, mask, torch.randn(24, generator=gen))
    dense = nn.Linear(40, 24)
    with torch.no_grad():
        dense.weight.copy_(w * mask)
        dense.bias.copy_(sparse.bias)
    sparse.weight.values.requires_grad_(True)
    x = torch.randn(2, 5, 40, generator=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys, yd = sparse(x), dense(x2)
    assert ys.dtype == yd.dtype == torch.bfloat16
    assert_close_eps(ys.float(), yd.float(), 2, torch.bfloat16)
    ys.float().square().sum().backward()
    yd.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and sparse.weight.values.grad.dtype == torch.float32
    assert_close_eps(x.grad, x2.grad, 2, torch.bfloat16)
    assert_close_eps(sparse.weight.values.grad, dense.weight.grad[mask], 2, torch.bfloat16)
    assert_close_eps(sparse.bias.grad, dense.bias.grad, 2, torch.bfloat16)


@pytest.mark.parametrize("train_values", [False, True])
def test_nothing_dense_is_kept_or_saved_for_backward(train_values):
    """Between calls a compressed Linear holds values + mask (+ bias); autograd saves no dense weight,
    and the input only when the values train (their gradient needs it)."""
    gen = torch.Generator().manual_seed(2)
    out_f, in_f = 32, 48
    layer = SparseLinear.from_dense(torch.randn(out_f, in_f, generator=gen), torch.rand(out_f, in_f, generator=gen) > 0.5)
    layer.weight.values.requires_grad_(train_values)
    state = {n: t.numel() for n, t in layer.state_dict().items()}
    assert state == {"weight.values": layer.weight.nnz, "weight.mask": out_f * in_f // 8}
    x = torch.randn(4, in_f, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    allowed = {layer.weight.values.data_ptr(), layer.weight.mask.data_ptr()} | ({x.data_ptr()} if train_values else set())
    assert saved and {t.data_ptr() for t in saved} <= allowed
    assert all(t.numel() != out_f * in_f for t in saved)
    assert (x.data_ptr() in {t.data_ptr() for t in saved}) == train_values
    y.sum().backward()
    assert x.grad is not None and (layer.weight.values.grad is not None) == train_values


# ============================================================================ a loaded sparse bundle


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sparse_bundle_logits_equal_the_base_with_the_same_zeros(sparse_bundle, variant):
    base, b = sparse_bundle(variant)
    model = load_pruned_model(b, dtype=torch.float64)
    modules = Bundle(b).sparsity["modules"]
    assert modules and all(isinstance(model.get_submodule(m), SparseLinear) for m in modules)
    assert not any(isinstance(m, SparseLinear) for n, m in model.named_modules() if n.startswith("model.layers.0."))
    # The compressed model holds nnz values per module, never a dense weight: parameters == the manifest's kept count.
    assert model.num_parameters() == json.loads((b / "loram.json").read_text())["parameters"]["pruned"]
    as_stored = load_pruned_model(b)  # the bundle's dtype
    held = sum(t.nbytes for m in modules for t in as_stored.get_submodule(m).state_dict().values())
    on_disk = sum(stored_tensor(b, k).nbytes for m in modules for k in (mask_key(m), values_key(m)))
    assert held == on_disk  # in memory exactly what the bundle stores
    reference = zero_filled_base(base, b, torch.float64)
    x = inputs()
    with torch.no_grad():
        got, want = model(**x).logits, reference(**x).logits
    # float64, the same products summed (zeros skipped or added): a few eps at the largest logit.
    assert_close_eps(got, want, 64)
    densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    with torch.no_grad():
        assert_close_eps(model(**x).logits, want, 64)


def test_every_family_loads_compressed_with_the_base_s_logits_and_lora_keys(make_base_dir, tmp_path, family_case):
    """Fused projections (Phi-3's qkv_proj, gate_up_proj), biases (Qwen2), Gemma's scaled embeddings: the
    compressed model is the zero-filled base, and PEFT's adapter on it has the base's keys and shapes."""
    base = make_base_dir(family_case)
    prune(base, tmp_path / "b", None, strategy="semi-structured", pattern="2:4", importance="magnitude", show_progress=False)
    model = load_pruned_model(tmp_path / "b", dtype=torch.float64)
    assert all(isinstance(model.get_submodule(m), SparseLinear) for m in Bundle(tmp_path / "b").sparsity["modules"])
    reference = zero_filled_base(base, tmp_path / "b", torch.float64)
    x = inputs()
    with torch.no_grad():
        assert_close_eps(model(**x).logits, reference(**x).logits, 64)
    targets = targets_of(base)
    config = dict(r=2, target_modules=targets, init_lora_weights=False)
    sparse = peft.get_peft_model(model, peft.LoraConfig(**config))
    dense = peft.get_peft_model(reference, peft.LoraConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(sparse).items()}
    assert shapes and shapes == {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(dense).items()}


def test_peft_puts_the_same_lora_on_a_sparse_model_as_on_the_dense_base(sparse_bundle, tmp_path):
    base, b = sparse_bundle("2:4")
    sparse = lora(load_pruned_model(b))
    dense = lora(AutoModelForCausalLM.from_pretrained(base))
    keys = peft.get_peft_model_state_dict(sparse)
    want = peft.get_peft_model_state_dict(dense)
    assert {k: tuple(v.shape) for k, v in keys.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert any(k.endswith("layers.3.self_attn.q_proj.lora_A.weight") for k in keys)
    lora_of = sparse.get_submodule("base_model.model.model.layers.3.mlp.down_proj")
    assert isinstance(lora_of, peft.tuners.lora.Linear) and isinstance(lora_of.base_layer, SparseLinear)
    with pytest.raises(LoramError, match="^a compressed sparse weight has no dense tensor"):
        sparse.merge_and_unload()  # PEFT's merge needs a dense weight: one clear line, not a shape error
    # A saved adapter loads back on a fresh sparse model and on the dense base with no missing or unexpected keys.
    sparse.save_pretrained(tmp_path / "adapter")
    for model in (load_pruned_model(b), AutoModelForCausalLM.from_pretrained(base)):
        loaded = peft.PeftModel.from_pretrained(model, tmp_path / "adapter")
        result = peft.set_peft_model_state_dict(loaded, keys)
        assert result.unexpected_keys == [] and not [k for k in result.missing_keys if "lora_" in k]


def test_lora_and_value_gradients_equal_a_zero_filled_dense_model(sparse_bundle):
    _, b = sparse_bundle("unstructured")
    x = inputs()
    sparse = lora(load_pruned_model(b, dtype=torch.float64))
    dense = lora(load_pruned_model(b, dtype=torch.float64, sparse="dense"))
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    got, want = loss_grads(sparse, x), loss_grads(dense, x)
    assert sorted(got) == sorted(want) and all("lora_" in n for n in got)
    for name in want:
        assert_close_eps(got[name], want[name], 256, msg=name)
    # Full-parameter gradients: a kept value's gradient is the dense weight's at its position.
    sparse, dense = load_pruned_model(b, dtype=torch.float64), load_pruned_model(b, dtype=torch.float64, sparse="dense")
    sparse.requires_grad_(True)
    dense.requires_grad_(True)
    got, want = loss_grads(sparse, x), loss_grads(dense, x)
    masks = masks_of(b)
    for module, mask in masks.items():
        assert_close_eps(got[values_key(module)], want[f"{module}.weight"][mask], 256, msg=module)
    for name in set(want) - {f"{m}.weight" for m in masks}:
        assert_close_eps(got[name], want[name], 256, msg=name)


def test_gradient_checkpointing_gives_the_same_lora_gradients(sparse_bundle):
    _, b = sparse_bundle("2:4")
    x = inputs()
    plain = lora(load_pruned_model(b, dtype=torch.float64))
    model = load_pruned_model(b, dtype=torch.float64)
    enable_activation_checkpointing(model, input_grads=True)
    model = lora(model)
    plain.train()
    model.train()
    recomputed = []  # the checkpointed layers' forwards run again in backward
    hook = model.get_submodule("base_model.model.model.layers.2.self_attn.q_proj.base_layer").register_forward_hook(
        lambda *_: recomputed.append(1)
    )
    got, want = loss_grads(model, x), loss_grads(plain, x)
    hook.remove()
    assert len(recomputed) == 2
    for name in want:
        assert_close_eps(got[name], want[name], 256, msg=name)


def test_generate_on_a_sparse_model_is_the_zero_filled_base(sparse_bundle):
    base, b = sparse_bundle("unstructured")
    x = inputs(2, 6)
    x["attention_mask"][:] = 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = load_pruned_model(b, dtype=torch.float64).generate(**x, **kw)
        want = zero_filled_base(base, b, torch.float64).generate(**x, **kw)
    assert got.shape == (2, 14) and torch.equal(got, want)


def test_load_checks_the_stored_sparse_tensors(sparse_bundle, tmp_path):
    """A mask or values entry that disagrees with the manifest is refused in one line, naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from loramkit.bundle.writer import finalize
    from loramkit.errors import BundleError

    _, b = sparse_bundle("2:4")
    module = Bundle(b).sparsity["modules"][0]

    def truncate_values(t: dict[str, torch.Tensor]) -> None:
        t[values_key(module)] = t[values_key(module)][:-1].clone()

    def break_pattern(t: dict[str, torch.Tensor]) -> None:
        t[mask_key(module)][0, 0] = 0x0F  # columns 0-3 keep 4, 4-7 keep 0: the count holds, 2:4 does not

    def retype_values(t: dict[str, torch.Tensor]) -> None:
        t[values_key(module)] = t[values_key(module)].half()

    messages = {}
    for what, tamper in {"values": truncate_values, "pattern": break_pattern, "dtype": retype_values}.items():
        copy = tmp_path / what
        shutil.copytree(b, copy)
        m = json.loads((copy / "loram.json").read_text())
        (file,) = m["weights"]["files"]
        tensors = load_file(copy / file)
        tamper(tensors)
        save_file(tensors, copy / file, metadata={"format": "pt"})
        (copy / "loram.json").unlink()
        finalize(copy, {k: v for k, v in m.items() if k not in ("files", "bundle_id")})
        with pytest.raises(BundleError) as err:
            load_pruned_model(copy)
        messages[what] = str(err.value)
        assert "\n" not in messages[what] and module in messages[what], messages[what]
    assert (
        "values, the mask keeps" in messages["values"] and "columns 0..3 keep 4, the 2:4 pattern keeps 2" in messages["pattern"]
    )
    assert "is F16[" in messages["dtype"] and "the manifest implies F32[" in messages["dtype"]


# ============================================================================ align and the CLI


def test_align_trains_kept_values_only_and_writes_the_same_masks(sparse_bundle, tmp_path):
    from loramkit.bundle.validate import validate
    from loramkit.train.align import align
    from loramkit.train.config import AlignConfig

    _, b = sparse_bundle("unstructured", torch.bfloat16)
    data = tmp_path / "c.txt"
    data.write_text("\n\n".join(sample_texts(200, seed=5)))
    cfg = AlignConfig(lr=5e-3, warmup_steps=0, micro_batch=4, seq_len=32, max_steps=3, precision="fp32", eval_split=0.1)
    s = align(b, data, tmp_path / "aligned", cfg, show_progress=False, log=lambda m: None)
    out = tmp_path / "aligned"
    before, after = json.loads((b / "loram.json").read_text()), s["manifest"]
    assert after["sparsity"] == before["sparsity"] and "sparse" in after["requires"]
    assert after["alignment"]["parent_bundle_id"] == before["bundle_id"] and after["alignment"]["steps"] == 3
    assert validate(out)[0] == []
    changed = 0
    for module in before["sparsity"]["modules"]:
        with (
            safe_open(b / before["weights"]["files"][0], "pt") as f0,
            safe_open(out / after["weights"]["files"][0], "pt") as f1,
        ):
            m0, m1 = f0.get_tensor(mask_key(module)), f1.get_tensor(mask_key(module))
            v0, v1 = f0.get_tensor(values_key(module)), f1.get_tensor(values_key(module))
        assert m0.numpy().tobytes() == m1.numpy().tobytes(), module  # the pattern, byte for byte
        assert v1.shape == v0.shape and v1.dtype == v0.dtype == torch.bfloat16
        changed += not torch.equal(v0, v1)
    assert changed == len(before["sparsity"]["modules"])  # every sparse module's kept values trained
    dense = load_pruned_model(out, dtype=torch.float32, sparse="dense")
    for module, mask in masks_of(b).items():
        w = dense.get_submodule(module).weight
        assert torch.count_nonzero(w[~mask]) == 0, module  # every pruned weight exactly zero


def test_train_and_eval_through_the_cli_on_a_sparse_bundle(sparse_bundle, tmp_path, capsys):
    from loramkit import cli

    _, b = sparse_bundle("2:4")
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(sample_texts(120, seed=6)))

    def run_json(*args: object) -> dict:
        rc = cli.run([str(a) for a in args] + ["--json"])
        out, err = capsys.readouterr()
        assert rc == 0 and "Traceback" not in err, err
        return json.loads(out)

    s = run_json("train", b, "--data", data, "--out", tmp_path / "a", "--max-steps", "3", "--seq-len", "32",
                 "--data-format", "text", "--gradient-checkpointing", "--precision", "fp32")  # fmt: skip
    assert s["steps"] == 3 and all(x == x for x in s["eval_history"] or [0])
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in keys)
    plain = run_json("eval", b, "--data", data, "--seq-len", "32", "--data-format", "text")
    tuned = run_json("eval", b, "--adapter", tmp_path / "a", "--data", data, "--seq-len", "32", "--data-format", "text")
    assert plain["tokens"] == tuned["tokens"] > 0 and tuned["loss"] != plain["loss"]
