"""Recovery of adapters trained on sparse bundles (LoRAM-Unst / LoRAM-Semi, spec 7.3).

A sparse bundle keeps every shape, so its adapter already fits the ORIGINAL base: recover
rebinds it (config and card name the base and its revision, the bundle tag goes), checks
every tensor's shape against the base's fingerprint and writes the tensors bitwise
unchanged; ``--merge`` merges into the original dense weights. Properties checked:

- the rebound adapter loads in stock PEFT on the original base with no missing and no
  unexpected keys (warnings are errors), with exactly the key set PEFT saves on the base;
- its tensors are the trained ones bit for bit, its config the trained one but for the base;
- the merged model equals ``PeftModel(base, adapter)`` in float64, pruned weights included
  (the base's values come back: the paper's recovery for these variants);
- the checks of structured recovery still refuse a foreign adapter, a wrong bundle, a tensor
  of the wrong shape and what PEFT could not load, and then nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramkit import Bundle
from loramkit.bundle.card import tags_of
from loramkit.bundle.manifest import ADAPTER_RECORD_NAME, BUNDLE_TAG_PREFIX, bundle_tag
from loramkit.bundle.sparse import mask_key, unpack_mask, values_key
from loramkit.cli import run
from loramkit.errors import AdapterError
from loramkit.recover.adapter import recover_adapter
from loramkit.recover.merge import merge_adapter
from tests.lora_helpers import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_KW,
    copy_dir,
    edit_config,
    ids,
    listing,
    load_state,
    quiet,
    read_adapter,
    write_adapter_tensors,
)
from tests.test_merge import assert_merge_matches_peft
from tests.test_recover import assert_loads_cleanly, refused

CASE = "llama_gqa"  # GQA, explicit head_dim; intermediate 172 = 43 groups of 4 columns
SPARSE = {
    "unstructured": dict(ratio=0.5, strategy="unstructured"),
    "semi-structured": dict(ratio=None, strategy="semi-structured", pattern="2:4"),
}
_CACHE: dict[tuple, Path] = {}


def sparse_bundle(tmp_path_factory, make_base_dir, strategy: str) -> Path:
    """A sparse bundle of CASE (magnitude; layers 2..6 of 8 sparse), built once per session."""
    from loramkit.prune.pruner import prune

    key = ("bundle", strategy)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(f"sparse_{strategy}", numbered=True) / "bundle"
        kw = dict(SPARSE[strategy])
        prune(make_base_dir(CASE), out, kw.pop("ratio"), importance="magnitude", keep_first=2, keep_last=1,
              show_progress=False, **kw)  # fmt: skip
        _CACHE[key] = out
    return _CACHE[key]


def trained_adapter(tmp_path_factory, bundle: Path) -> Path:
    """A LoRA adapter saved by PEFT from ``load_pruned_model(bundle)`` (compressed sparse Linears),
    with the ``loram_adapter.json`` record ``loramkit train`` writes; random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    from loramkit.model.loader import load_pruned_model

    key = ("adapter", str(bundle))
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("sparse_adapter", numbered=True) / "adapter"
        torch.manual_seed(0)
        with quiet():
            model = get_peft_model(load_pruned_model(bundle), LoraConfig(**LORA_KW))
        model.save_pretrained(out)
        b = Bundle(bundle)
        record = {"format": "loram-adapter", "version": 1, "bundle_id": b.bundle_id, "bundle": str(b.path.resolve()),
                  "bundle_ref": None, "base": {"name_or_path": b.base["name_or_path"], "revision": b.base.get("revision")}}  # fmt: skip
        (out / ADAPTER_RECORD_NAME).write_text(json.dumps(record))
        _CACHE[key] = out
    return _CACHE[key]


@pytest.fixture(scope="module", params=list(SPARSE))
def trained(request, tmp_path_factory, make_base_dir) -> tuple[Path, Path, Path]:
    """(base, sparse bundle, adapter trained on it) for each sparse strategy."""
    bundle = sparse_bundle(tmp_path_factory, make_base_dir, request.param)
    return make_base_dir(CASE), bundle, trained_adapter(tmp_path_factory, bundle)


# --------------------------------------------------------------------------- rebinding


def test_rebound_adapter_is_the_trained_one_and_loads_on_the_original_base(trained, tmp_path):
    base, bundle, adapter = trained
    b = Bundle(bundle)
    assert b.sparsity and b.index_maps == {}, "not a sparse bundle: the test would test structured recovery"
    assert bundle_tag(b.bundle_id) in tags_of(adapter / "README.md")  # PEFT copied the bundle's tag
    summary = recover_adapter(adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["recovery"] == "rebind" and summary["bundle_id"] == b.bundle_id
    assert sorted(p.name for p in out.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    cfg, trained_t = read_adapter(adapter)
    out_cfg, out_t = read_adapter(out)
    assert out_t.keys() == trained_t.keys()
    for k, t in trained_t.items():  # bitwise unchanged: same dtype, shape and bytes
        assert out_t[k].dtype == t.dtype and out_t[k].shape == t.shape, k
        assert out_t[k].numpy().tobytes() == t.numpy().tobytes(), k
    # Every projection of the sparsified layers is adapted, at the base's own shape.
    base_shapes = {n: tuple(e["shape"]) for n, e in b.base["tensors"].items()}
    for module in b.sparse_modules:
        a, bm = out_t[f"base_model.model.{module}.lora_A.weight"], out_t[f"base_model.model.{module}.lora_B.weight"]
        assert (bm.shape[0], a.shape[1]) == base_shapes[f"{module}.weight"], module

    assert out_cfg["base_model_name_or_path"] == b.base["name_or_path"] == str(base)
    assert out_cfg["revision"] == b.base.get("revision")
    assert {k: v for k, v in out_cfg.items() if k not in ("base_model_name_or_path", "revision")} == {
        k: v for k, v in cfg.items() if k not in ("base_model_name_or_path", "revision")
    }
    card = (out / "README.md").read_text()
    assert not [t for t in tags_of(out / "README.md") if t.startswith(BUNDLE_TAG_PREFIX)]
    assert "sparse bundle" in card and "zeros on pruned channels" not in card

    model = assert_loads_cleanly(base, adapter, out)  # strict: any PEFT warning (missing keys) fails
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    assert (adapted - plain).abs().max() > 1e-3


def test_merge_restores_the_dense_weights_and_equals_peft_on_the_base(trained, tmp_path):
    """--merge: base (every pruned weight back) + s B A, equal to PeftModel(base) in float64."""
    base, bundle, adapter = trained
    b = Bundle(bundle)
    merged = tmp_path / "merged"
    then = lambda staged, bb: merge_adapter(base, staged, merged, bb, show_progress=False)  # noqa: E731
    recover_adapter(adapter, tmp_path / "out", then=then)
    assert_merge_matches_peft(base, tmp_path / "out", merged)
    # The sparse model's weights are NOT what was merged into: at pruned positions the merged
    # weight is the base's value plus the delta, not the delta alone.
    module = sorted(b.sparse_modules)[0]
    with b.weights() as ckpt:
        packed, values = ckpt.get(mask_key(module)), ckpt.get(values_key(module))
    base_w, merged_w = load_state(base)[f"{module}.weight"], load_state(merged)[f"{module}.weight"]
    mask = unpack_mask(packed, base_w.shape[1])  # (out, in) bool: the kept weights
    assert int(mask.sum()) == values.numel()
    assert not mask.all() and base_w[~mask].abs().min() > 0  # the base really had weights there
    cfg, t = read_adapter(tmp_path / "out")
    a, bm = t[f"base_model.model.{module}.lora_A.weight"], t[f"base_model.model.{module}.lora_B.weight"]
    delta = (bm.double() @ a.double()) * (cfg["lora_alpha"] / cfg["r"])
    err = (merged_w.double() - (base_w.double() + delta))[~mask].abs().max()
    assert err <= 4 * torch.finfo(torch.float32).eps * (base_w.double() + delta).abs().max()


# --------------------------------------------------------------------------- the usual refusals


def test_refuses_the_adapter_of_another_sparse_bundle_with_the_same_shapes(tmp_path_factory, make_base_dir, tmp_path):
    """Unstructured and 2:4 bundles of one base have the same shapes: only the evidence tells them apart."""
    unst = sparse_bundle(tmp_path_factory, make_base_dir, "unstructured")
    semi = sparse_bundle(tmp_path_factory, make_base_dir, "semi-structured")
    adapter = copy_dir(trained_adapter(tmp_path_factory, unst), tmp_path / "adapter")
    refused(tmp_path / "a", lambda out: recover_adapter(adapter, out, semi), AdapterError, "trained on")
    # Record gone, card gone: the name still points at the bundle it was trained on.
    (adapter / ADAPTER_RECORD_NAME).unlink()
    (adapter / "README.md").unlink()
    refused(tmp_path / "b", lambda out: recover_adapter(adapter, out, semi), AdapterError, "trained on")
    recover_adapter(adapter, tmp_path / "ok", unst)  # control: its own bundle takes it


def test_refuses_a_tensor_whose_shape_is_not_the_bases(trained, tmp_path):
    _, bundle, adapter = trained
    adapter = copy_dir(adapter, tmp_path / "adapter")
    _, tensors = read_adapter(adapter)
    module = sorted(Bundle(bundle).sparse_modules)[0]
    key = f"base_model.model.{module}.lora_A.weight"
    tensors[key] = tensors[key][:, :-4].contiguous()  # (r, in - 4): a structured bundle's shape
    write_adapter_tensors(adapter, tensors)
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, "shape")


def test_refuses_what_peft_could_not_load(trained, tmp_path):
    _, bundle, adapter = trained
    adapter = copy_dir(adapter, tmp_path / "adapter")
    edit_config(adapter, r=LORA_KW["r"] + 1)
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, "rank")


def test_refuses_an_adapter_of_the_full_base(trained, tmp_path):
    base, bundle, adapter = trained
    adapter = copy_dir(adapter, tmp_path / "adapter")
    (adapter / ADAPTER_RECORD_NAME).unlink()
    (adapter / "README.md").unlink()
    edit_config(adapter, base_model_name_or_path=str(base))
    refused(tmp_path, lambda out: recover_adapter(adapter, out, bundle), AdapterError, "needs no recovery")


# --------------------------------------------------------------------------- CLI


def test_cli_recover_and_merge_a_sparse_adapter(trained, tmp_path, capsys):
    base, bundle, adapter = trained
    out, merged = tmp_path / "out", tmp_path / "merged"
    args = ["recover", str(adapter), "--out", str(out), "--merge", "--base", str(base), "--merged-out", str(merged)]
    assert run([*args, "--json"]) == 0  # the bundle found from the adapter's record
    summary = json.loads(capsys.readouterr().out)
    assert summary["recovery"] == "rebind" and summary["merged"] == str(merged)
    assert read_adapter(out)[1].keys() == read_adapter(adapter)[1].keys()
    assert_merge_matches_peft(base, out, merged)
    assert run(["recover", str(adapter), "--out", str(tmp_path / "again"), "--bundle", str(bundle)]) == 0
    assert "rebound (sparse bundle: shapes unchanged)" in capsys.readouterr().out
    assert listing(tmp_path / "again") == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_an_aligned_sparse_bundles_adapter_rebinds_to_the_original_base(tmp_path_factory, make_base_dir, tmp_path):
    """Alignment trains the kept values (paper: its updates are not used at inference): the adapter
    still goes to the ORIGINAL base and merges into its dense weights, and only the aligned bundle,
    the one it was trained on, takes it."""
    from loramkit.train.align import align
    from loramkit.train.config import AlignConfig
    from tests.factory import sample_texts

    parent = sparse_bundle(tmp_path_factory, make_base_dir, "semi-structured")
    data = tmp_path / "c.txt"
    data.write_text("\n\n".join(sample_texts(60, seed=5)))
    cfg = AlignConfig(lr=5e-3, warmup_steps=0, micro_batch=4, seq_len=32, max_steps=2, precision="fp32", eval_split=0.1)
    align(parent, data, tmp_path / "aligned", cfg, show_progress=False, log=lambda m: None)
    aligned = tmp_path / "aligned"
    assert Bundle(aligned).base == Bundle(parent).base and Bundle(aligned).bundle_id != Bundle(parent).bundle_id
    adapter = trained_adapter(tmp_path_factory, aligned)
    refused(tmp_path / "a", lambda out: recover_adapter(adapter, out, parent), AdapterError, "trained on")
    base, out, merged = make_base_dir(CASE), tmp_path / "out", tmp_path / "merged"
    then = lambda staged, bb: merge_adapter(base, staged, merged, bb, show_progress=False)  # noqa: E731
    assert recover_adapter(adapter, out, then=then)["bundle_id"] == Bundle(aligned).bundle_id
    assert read_adapter(out)[0]["base_model_name_or_path"] == str(base)
    assert_merge_matches_peft(base, out, merged)
