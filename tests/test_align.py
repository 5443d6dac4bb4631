"""loramkit align: held-out loss goes down, what stays and what trains, the manifest record,
resume equivalence, refusals, two processes (DDP and FSDP), recovery of adapters trained on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramkit.bundle import Bundle
from loramkit.bundle.validate import validate
from loramkit.errors import LoramError
from loramkit.prune.pruner import prune
from loramkit.train.align import align, heldout_indices
from loramkit.train.config import AlignConfig
from tests.factory import sample_texts, tiny_tokenizer
from tests.lora_helpers import peft_on_base

ROOT = Path(__file__).resolve().parent.parent
_UNCHANGED_SECTIONS = ("base", "architecture", "pruning", "parameters", "weights", "index_maps", "quantization")


def _cfg(**kw) -> AlignConfig:
    base = dict(lr=2e-3, warmup_steps=2, micro_batch=4, seq_len=32, max_steps=4, precision="fp32", eval_split=0.1)
    return AlignConfig(**(base | kw))


def _align(*args, **kw):
    return align(*args, show_progress=False, log=lambda m: None, **kw)


def _sha256sum_digest(root: Path, rels: list[str]) -> str:
    """The corpus digest computed as the spec tells a user to: sha256sum, then sha256sum of that."""
    if shutil.which("sha256sum"):
        listing = subprocess.run(["sha256sum", *sorted(rels)], cwd=root, capture_output=True, check=True).stdout
    else:  # pragma: no cover
        listing = "".join(f"{hashlib.sha256((root / r).read_bytes()).hexdigest()}  {r}\n" for r in sorted(rels)).encode()
    return hashlib.sha256(listing).hexdigest()


@pytest.fixture(scope="module")
def bundle(make_base_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A bf16 base (the aligned fp32 master weights are rounded back to bf16) and its 0.5 bundle."""
    base = make_base_dir("llama_gqa", dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("align") / "bundle"
    prune(base, out, 0.5, show_progress=False)
    return base, out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """A directory corpus: (root, the files that count, their documents in reading order)."""
    root = tmp_path_factory.mktemp("corpus")
    a, b = sample_texts(300, seed=3), sample_texts(100, seed=4)
    (root / "a.txt").write_text("\n\n".join(a))
    (root / "sub").mkdir()
    rows = [{"text": t} for t in b[:50]] + [{"meta": "no text"}] + [{"text": t} for t in b[50:]]
    (root / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "notes.md").write_text("not a corpus file")
    (root / ".hidden.txt").write_text("hidden, ignored")
    (root / "sub" / ".cache").mkdir()
    (root / "sub" / ".cache" / "c.txt").write_text("inside a dot-directory, ignored")
    return root, ["a.txt", "sub/b.jsonl"], a + b


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "c.txt"
    p.write_text("\n\n".join(sample_texts(400, seed=5)))
    return p


@pytest.fixture(scope="module")
def aligned(bundle, corpus, tmp_path_factory) -> tuple[Path, dict]:
    """30 steps with the default precision (fp32 master weights, bf16 autocast) on the directory corpus."""
    _, b = bundle
    out = tmp_path_factory.mktemp("aligned") / "aligned"
    s = _align(b, corpus[0], out, _cfg(max_steps=30, precision="bf16-mixed"), description="test mix 2:1")
    return out, s


def test_align_lowers_held_out_loss_and_the_manifest_records_it(bundle, corpus, aligned):
    _, b = bundle
    out, s = aligned
    root, rels, docs = corpus
    al = json.loads((out / "loram.json").read_text())["alignment"]
    before, after = al["heldout_loss"]["before"], al["heldout_loss"]["after"]
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.3, s["eval_history"]
    assert (before, after) == (round(s["heldout_loss_before"], 6), round(s["heldout_loss_after"], 6))
    assert al["parent_bundle_id"] == Bundle(b).bundle_id == s["parent_bundle_id"] != s["bundle_id"]
    assert al["steps"] == s["steps"] == 30
    assert al["tokens_seen"] == 30 * 4 * 32 == al["hyperparameters"]["global_batch_tokens"] * 30
    tok = tiny_tokenizer()  # every document is [bos] ids [eos]: bos=1 and eos=2 differ
    expected_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs)
    assert al["corpus"] == {"sha256": _sha256sum_digest(root, rels), "description": "test mix 2:1",
                            "num_tokens": expected_tokens, "files": 2, "documents": 400}  # fmt: skip
    hp = al["hyperparameters"]
    assert hp["lr"] == 2e-3 and hp["warmup_steps"] == 2 and hp["schedule"] == "cosine" and hp["optimizer"] == "adamw"
    assert (hp["seq_len"], hp["micro_batch"], hp["grad_accum"], hp["world_size"]) == (32, 4, 1, 1)
    assert hp["precision"] == "bf16-mixed" and hp["train_lm_head"] is False and hp["distributed"] is None
    n_blocks = expected_tokens // 32
    assert al["heldout_loss"]["split"] == 0.1 and al["heldout_loss"]["num_tokens"] == int(n_blocks * 0.1) * 31
    assert s["corpus"]["heldout_blocks"] + s["corpus"]["blocks"] == n_blocks


def test_aligned_bundle_keeps_the_layout_trains_every_weight_but_lm_head_and_validates(bundle, aligned):
    from loramkit.model.loader import load_pruned_model

    _, b = bundle
    out, _ = aligned
    parent, child = Bundle(b).manifest, Bundle(out).manifest
    for key in _UNCHANGED_SECTIONS:
        assert child[key] == parent[key], key
    assert parent["alignment"] is None and child["alignment"] is not None
    weight_files = set(parent["weights"]["files"])
    for rel, entry in parent["files"].items():  # index maps, config, tokenizer: byte for byte
        if rel not in weight_files and rel != "README.md":
            assert child["files"][rel] == entry, rel
    old, new = load_file(str(b / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert list(old) == list(new)
    for name in old:
        assert (new[name].dtype, new[name].shape) == (old[name].dtype, old[name].shape), name
        if name == "lm_head.weight":
            assert torch.equal(new[name], old[name])
        else:
            assert not torch.equal(new[name], old[name]), f"{name} did not train"
    assert new["lm_head.weight"].dtype == torch.bfloat16
    assert validate(out) == ([], [])
    model = load_pruned_model(out)
    assert model.lm_head.weight.shape[0] == child["architecture"]["vocab_size"]
    assert "tokens of continual pre-training on test mix 2:1 (held-out loss" in (out / "README.md").read_text()


@pytest.mark.parametrize("train_lm_head", [False, True])
def test_tied_embedding_is_lm_head_frozen_unless_asked(make_base_dir, text_file, tmp_path, train_lm_head):
    b = tmp_path / "tied"
    prune(make_base_dir("llama_tied"), b, 0.5, show_progress=False)
    # Activation checkpointing with a frozen embedding: the layers' inputs need no grad, the layers still train.
    cfg = _cfg(max_steps=2, train_lm_head=train_lm_head, gradient_checkpointing=not train_lm_head, eval_split=0)
    _align(b, text_file, tmp_path / "out", cfg)
    old, new = load_file(str(b / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in new  # tied: stored once, as the embedding
    assert torch.equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"]) is not train_lm_head
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight"):
        assert not torch.equal(old[name], new[name]), name
    assert validate(tmp_path / "out") == ([], [])


def test_train_lm_head_trains_an_untied_lm_head(bundle, text_file, tmp_path):
    _, b = bundle
    s = _align(b, text_file, tmp_path / "out", _cfg(max_steps=2, train_lm_head=True, eval_split=0))
    old, new = load_file(str(b / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not torch.equal(old["lm_head.weight"], new["lm_head.weight"])
    assert s["manifest"]["alignment"]["hyperparameters"]["train_lm_head"] is True


def test_a_sharded_bundle_keeps_its_shards_and_index(make_base_dir, text_file, tmp_path):
    b = tmp_path / "sharded"
    prune(make_base_dir("llama_gqa"), b, 0.5, max_shard_size="400KB", show_progress=False)
    parent = Bundle(b).manifest
    assert len(parent["weights"]["files"]) > 1
    s = _align(b, text_file, tmp_path / "out", _cfg(max_steps=1, precision="bf16", eval_split=0))
    child = s["manifest"]
    assert child["weights"] == parent["weights"]
    index = parent["weights"]["index"]
    assert (tmp_path / "out" / index).read_bytes() == (b / index).read_bytes()
    for file in parent["weights"]["files"]:
        old, new = load_file(str(b / file)), load_file(str(tmp_path / "out" / file))
        assert [(k, v.dtype, v.shape) for k, v in old.items()] == [(k, v.dtype, v.shape) for k, v in new.items()]
    assert validate(tmp_path / "out") == ([], [])


def test_token_budget_sets_the_steps_and_no_held_out_set_records_null(bundle, text_file, tmp_path):
    _, b = bundle
    s = _align(b, text_file, tmp_path / "out", _cfg(max_steps=None, tokens=1000, eval_split=0))
    al = s["manifest"]["alignment"]
    assert al["steps"] == 8 and al["tokens_seen"] == 8 * 128  # ceil(1000 / (4 x 32))
    assert al["heldout_loss"] is None and s["heldout_loss_before"] is None
    # A single file is a corpus of one, named by its base name.
    assert al["corpus"]["sha256"] == _sha256sum_digest(text_file.parent, [text_file.name])
    assert "tokens of continual pre-training\n" in (tmp_path / "out" / "README.md").read_text()
    assert validate(tmp_path / "out") == ([], [])


def test_resume_matches_an_uninterrupted_run_bitwise(bundle, text_file, tmp_path):
    _, b = bundle
    cfg = _cfg(max_steps=6, save_every=2, grad_accum=2, eval_every=2)
    full = _align(b, text_file, tmp_path / "full", cfg)
    part = _align(b, text_file, tmp_path / "part", cfg, stop_after=3)
    assert part["interrupted"] and not (tmp_path / "part").exists()
    assert (tmp_path / "part.ckpt" / "step-0000003").is_dir()
    with pytest.raises(LoramError, match="different config"):
        _align(b, text_file, tmp_path / "part", _cfg(max_steps=6, save_every=2, grad_accum=2, eval_every=2, lr=1e-3),
               resume=True)  # fmt: skip
    resumed = _align(b, text_file, tmp_path / "part", cfg, resume=True)
    assert resumed["eval_history"] == full["eval_history"]  # held-out loss before training survives the resume
    assert resumed["bundle_id"] == full["bundle_id"]  # the manifest, and with it every file hash, is equal
    assert (tmp_path / "part" / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
    assert not (tmp_path / "part.ckpt").exists()
    with pytest.raises(LoramError, match="nothing to resume"):
        _align(b, text_file, tmp_path / "other", cfg, resume=True)


def test_refuses_a_4_bit_bundle(bundle, text_file, tmp_path):
    from loramkit.quant import quantize_bundle

    _, b = bundle
    quantize_bundle(b, tmp_path / "nf4", quant_type="nf4", show_progress=False)
    with pytest.raises(LoramError, match="align the 16-bit bundle it was quantized from first, then quantize"):
        _align(tmp_path / "nf4", text_file, tmp_path / "out", _cfg())
    assert not (tmp_path / "out").exists()


def test_refusals(bundle, text_file, tmp_path):
    _, b = bundle
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no corpus here")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n  \n")
    (tmp_path / "blank" / "b.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (tmp_path / "one.txt").write_text(sample_texts(1, seed=9)[0])  # 17 tokens
    (tmp_path / "two.txt").write_text("\n\n".join(sample_texts(2, seed=9)))  # 54 tokens: one block of 32
    cases = [
        (dict(data=tmp_path / "empty"), "no .txt or .jsonl files"),
        (dict(data=tmp_path / "blank"), "no usable text"),
        (dict(data=tmp_path / "missing.txt"), "corpus not found"),
        (dict(cfg=_cfg(seq_len=4096)), "max_position_embeddings 256"),
        (dict(cfg=_cfg(tokens=100)), "--tokens or --max-steps, not both"),
        (dict(cfg=_cfg(fsdp=True)), "--fsdp shards the model over several processes"),
        (dict(data=tmp_path / "one.txt"), "fewer than one block of --seq-len 32"),
        (dict(data=tmp_path / "two.txt"), "1 block\\(s\\), too few to hold out 10%"),
        (dict(out=b), "is the bundle being aligned"),
    ]
    for kw, message in cases:
        with pytest.raises(LoramError, match=message):
            _align(b, kw.get("data", text_file), kw.get("out", tmp_path / "out"), kw.get("cfg", _cfg()), overwrite="out" in kw)
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(LoramError, match="already exists"):
        _align(b, text_file, tmp_path / "out", _cfg())


def test_a_diverged_run_writes_nothing(bundle, text_file, tmp_path, monkeypatch):
    """NaN is not JSON a reader accepts (spec 2): no manifest may record it."""
    import loramkit.train.loop as loop

    _, b = bundle
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {"loss": float("nan"), "tokens": 31})
    with pytest.raises(LoramError, match="training diverged"):
        _align(b, text_file, tmp_path / "out", _cfg(max_steps=1))
    assert not (tmp_path / "out").exists()


def test_heldout_blocks_are_spread_over_the_corpus():
    assert heldout_indices(10, 0.3) == [1, 5, 8]
    assert heldout_indices(1000, 0.01)[::5] == [50, 550]  # every 100th block, from the 50th
    assert heldout_indices(5, 0.01) == [2]  # at least one
    with pytest.raises(LoramError, match="too few"):
        heldout_indices(1, 0.5)


def test_cli_align_prints_a_summary_and_inspect_shows_the_alignment(bundle, text_file, tmp_path, capsys):
    from loramkit.cli import run

    _, b = bundle
    out = tmp_path / "a"
    args = ["align", str(b), "--data", str(text_file), "--out", str(out), "--max-steps", "2", "--seq-len", "32",
            "--warmup-steps", "0", "--description", "sample texts"]  # fmt: skip
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "held-out loss" in printed and Bundle(b).bundle_id in printed
    assert run(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert run(["inspect", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["alignment"]
    assert shown["corpus"]["description"] == "sample texts" and shown["steps"] == 2
    assert run(["validate", str(out)]) == 0


def test_an_adapter_trained_on_the_aligned_bundle_recovers_onto_the_original(bundle, aligned, text_file, tmp_path):
    from loramkit.cli import run
    from loramkit.train.config import TrainConfig
    from loramkit.train.trainer import train

    base, _ = bundle
    out, _ = aligned
    train(out, text_file, tmp_path / "a", TrainConfig(rank=4, max_steps=2, seq_len=32, precision="fp32"), show_progress=False)
    assert run(["recover", str(tmp_path / "a"), "--out", str(tmp_path / "full")]) == 0  # the record names the bundle
    model = peft_on_base(base, tmp_path / "full")  # any warning (missing keys) fails
    loaded = {k for k, _ in model.named_parameters() if "lora_" in k}
    assert len(loaded) == len(load_file(str(tmp_path / "full" / "adapter_model.safetensors"))) > 0


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAMKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_with_ddp(bundle, text_file, tmp_path):
    """torchrun --nproc_per_node 2: one bundle, written once, sound, and the loss went down."""
    _, b = bundle
    out = tmp_path / "ddp"
    proc = _torchrun("-m", "loramkit", "align", str(b), "--data", str(text_file), "--out", str(out),
                     "--max-steps", "20", "--seq-len", "32", "--micro-batch", "2", "--lr", "2e-3",
                     "--warmup-steps", "2", "--precision", "fp32", "--eval-split", "0.1")  # fmt: skip
    assert proc.stdout.count("aligned ") == 1  # rank 0 prints the summary alone
    al = json.loads((out / "loram.json").read_text())["alignment"]
    assert al["hyperparameters"]["world_size"] == 2 and al["hyperparameters"]["distributed"] == "ddp"
    assert al["tokens_seen"] == 20 * 2 * 2 * 32
    assert al["heldout_loss"]["after"] < al["heldout_loss"]["before"] - 0.3
    assert validate(out) == ([], [])
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "ddp.ckpt").exists()


_FSDP_SCRIPT = """
import json, os, sys
from loramkit.train.align import align
from loramkit.train.config import AlignConfig
b, data, tmp = sys.argv[1:]
cfg = AlignConfig(lr=2e-3, warmup_steps=2, max_steps=6, seq_len=32, micro_batch=2, grad_accum=2,
                  precision="fp32", eval_split=0.1, save_every=2, fsdp=True)
quiet = dict(show_progress=False, log=lambda m: None)
full = align(b, data, tmp + "/full", cfg, **quiet)
assert align(b, data, tmp + "/part", cfg, stop_after=3, **quiet)["interrupted"]
resumed = align(b, data, tmp + "/part", cfg, resume=True, **quiet)
if int(os.environ["RANK"]) == 0:
    json.dump({"full": full["bundle_id"], "resumed": resumed["bundle_id"]}, open(tmp + "/ids.json", "w"))
"""


def test_fsdp_shards_over_two_processes_and_resumes_bitwise(bundle, text_file, tmp_path):
    """--fsdp (FSDP2 over gloo): each tensor gathered to rank 0 for writing; resume as exact as DDP's."""
    _, b = bundle
    script = tmp_path / "fsdp_run.py"
    script.write_text(_FSDP_SCRIPT)
    _torchrun(str(script), str(b), str(text_file), str(tmp_path))
    ids = json.loads((tmp_path / "ids.json").read_text())
    assert ids["full"] == ids["resumed"]
    full = tmp_path / "full"
    al = json.loads((full / "loram.json").read_text())["alignment"]
    assert al["hyperparameters"]["distributed"] == "fsdp" and al["steps"] == 6
    assert al["heldout_loss"]["after"] < al["heldout_loss"]["before"]
    old, new = load_file(str(b / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert torch.equal(old["lm_head.weight"], new["lm_head.weight"])
    assert not torch.equal(old["model.norm.weight"], new["model.norm.weight"])
    assert validate(full) == ([], [])
