"""loramkit train: learning, resume equivalence, recover round trip, refusals, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramkit.errors import LoramError
from loramkit.prune.pruner import prune
from loramkit.train.config import TrainConfig
from loramkit.train.trainer import BatchPlan, train
from tests.factory import sample_texts
from tests.lora_helpers import peft_on_base

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(make_base_dir, tmp_path_factory) -> tuple[Path, Path]:
    base = make_base_dir("llama_gqa")
    out = tmp_path_factory.mktemp("train") / "bundle"
    prune(base, out, 0.5, show_progress=False)
    return base, out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text("\n\n".join(sample_texts(400, seed=3)))
    return p


def _cfg(**kw) -> TrainConfig:
    base = dict(rank=4, alpha=8, dropout=0.1, lr=5e-3, micro_batch=4, seq_len=32, max_steps=8, precision="fp32", seed=1)
    return TrainConfig(**(base | kw))


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_batch_plan_covers_each_epoch_once_and_shards_disjointly():
    plan = BatchPlan(n=10, micro_batch=2, grad_accum=2, world=2, seed=0)  # global batch 8
    stream = []  # the global order: step, then micro-batch k, then rank
    for step in range(5):
        per_rank = [plan.micro_batches(step, r) for r in range(2)]
        for k in range(2):
            for r in range(2):
                stream += per_rank[r][k]
    assert len(stream) == 40
    for epoch in range(4):  # every window of n positions is one permutation of the data
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    step0 = [{i for mb in plan.micro_batches(0, r) for i in mb} for r in range(2)]
    assert not step0[0] & step0[1]
    assert plan.micro_batches(3, 1) == BatchPlan(10, 2, 2, 2, 0).micro_batches(3, 1)  # a pure function


def test_training_lowers_held_out_loss_and_records_the_bundle(bundle, text_file, tmp_path):
    _, b = bundle
    s = train(b, text_file, tmp_path / "a", _cfg(max_steps=30, eval_split=0.1, eval_every=10), show_progress=False)
    assert s["steps"] == 30 and s["tokens"] > 0 and s["peak_memory_bytes"] > 0
    first_eval, last = s["eval_history"][0][1], s["eval_loss"]
    assert last < first_eval - 0.05, s["eval_history"]
    record = json.loads((tmp_path / "a" / "loram_adapter.json").read_text())
    from loramkit.bundle import Bundle

    assert record["bundle_id"] == Bundle(b).bundle_id and record["bundle"] == str(b.resolve())
    assert record["training"]["summary"]["steps"] == 30
    assert not (tmp_path / "a.ckpt").exists()


def test_held_out_metrics_of_the_summary_are_those_of_loramkit_eval(bundle, text_file, tmp_path, capsys):
    from loramkit.cli import run

    _, b = bundle
    s = train(b, text_file, tmp_path / "a", _cfg(max_steps=3), eval_data=text_file, show_progress=False)
    capsys.readouterr()
    argv = [
        "eval",
        str(b),
        "--adapter",
        str(tmp_path / "a"),
        "--data",
        str(text_file),
        "--seq-len",
        "32",
        "--micro-batch",
        "4",
        "--json",
    ]
    assert run(argv) == 0
    e = json.loads(capsys.readouterr().out)
    assert 0 < s["eval_accuracy"] < 1
    assert s["eval_loss"] == pytest.approx(e["loss"], abs=1e-5) and s["eval_accuracy"] == e["accuracy"]


def test_resume_matches_an_uninterrupted_run_bitwise(bundle, text_file, tmp_path):
    _, b = bundle
    cfg = _cfg(max_steps=6, save_every=2, grad_accum=2)
    full = train(b, text_file, tmp_path / "full", cfg, show_progress=False)
    part = train(b, text_file, tmp_path / "part", cfg, show_progress=False, stop_after=3)
    assert part["interrupted"] and not (tmp_path / "part").exists()
    assert (tmp_path / "part.ckpt" / "step-0000003").is_dir()
    resumed = train(b, text_file, tmp_path / "part", cfg, resume=True, show_progress=False)
    assert resumed["steps"] == full["steps"] == 6
    a, c = _adapter(tmp_path / "full"), _adapter(tmp_path / "part")
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_resume_refuses_other_options_and_missing_checkpoints(bundle, text_file, tmp_path):
    _, b = bundle
    train(b, text_file, tmp_path / "x", _cfg(max_steps=4, save_every=1), show_progress=False, stop_after=2)
    with pytest.raises(LoramError, match="different config"):
        train(b, text_file, tmp_path / "x", _cfg(max_steps=4, save_every=1, lr=1e-3), resume=True, show_progress=False)
    with pytest.raises(LoramError, match="nothing to resume"):
        train(b, text_file, tmp_path / "y", _cfg(), resume=True, show_progress=False)


def test_train_then_recover_loads_cleanly_on_the_base(bundle, text_file, tmp_path):
    from loramkit.cli import run

    base, b = bundle
    train(b, text_file, tmp_path / "a", _cfg(max_steps=3), show_progress=False)
    assert run(["recover", str(tmp_path / "a"), "--out", str(tmp_path / "full")]) == 0  # no --bundle: the record says
    model = peft_on_base(base, tmp_path / "full")  # any warning (missing keys) fails
    loaded = {k for k, _ in model.named_parameters() if "lora_" in k}
    assert len(loaded) == len(load_file(str(tmp_path / "full" / "adapter_model.safetensors"))) > 0


def test_recover_refuses_the_adapter_with_another_bundle(bundle, text_file, tmp_path, make_base_dir):
    from loramkit.errors import AdapterError
    from loramkit.recover.adapter import recover_adapter

    base, b = bundle
    train(b, text_file, tmp_path / "a", _cfg(max_steps=1), show_progress=False)
    other = tmp_path / "other"
    prune(base, other, 0.5, importance="random", seed=7, show_progress=False)
    with pytest.raises(AdapterError, match="trained on bundle"):
        recover_adapter(tmp_path / "a", tmp_path / "out", other)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "\n\n  \n", '{"foo": 1}\n{"bar": 2}\n'])
def test_refuses_data_with_no_usable_rows(bundle, tmp_path, content):
    _, b = bundle
    data = tmp_path / ("d.jsonl" if "{" in content else "d.txt")
    data.write_text(content)
    with pytest.raises(LoramError, match="no usable"):
        train(b, data, tmp_path / "a", _cfg(), show_progress=False)
    assert not (tmp_path / "a").exists()


def test_refuses_a_sequence_length_the_model_cannot_take(bundle, text_file, tmp_path):
    _, b = bundle
    with pytest.raises(LoramError, match="max_position_embeddings 256"):
        train(b, text_file, tmp_path / "a", _cfg(seq_len=4096), show_progress=False)


def test_cli_train_prints_summary_and_refuses_existing_out(bundle, text_file, tmp_path, capsys):
    from loramkit.cli import run

    _, b = bundle
    args = ["train", str(b), "--data", str(text_file), "--out", str(tmp_path / "a"), "--max-steps", "2", "--seq-len", "32"]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "peak memory" in out
    assert run(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_two_processes_with_gloo(bundle, text_file, tmp_path):
    """torchrun --nproc_per_node 2: one adapter, loadable, and the loss went down."""
    _, b = bundle
    out = tmp_path / "ddp"
    env = {**os.environ, "LORAMKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loramkit", "train", str(b), "--data", str(text_file), "--out", str(out),
           "--max-steps", "20", "--seq-len", "32", "--micro-batch", "2", "--lr", "5e-3", "--rank", "4",
           "--precision", "fp32", "--eval-split", "0.1", "--eval-every", "5"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained ") == 1  # rank 0 prints the summary alone
    record = json.loads((out / "loram_adapter.json").read_text())
    s = record["training"]["summary"]
    assert s["world_size"] == 2
    assert s["eval_loss"] < s["eval_history"][0][1] - 0.05
    import peft

    from loramkit.model.loader import load_pruned_model

    model = peft.PeftModel.from_pretrained(load_pruned_model(b), out)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not list(tmp_path.glob(".*tmp*"))


def test_gradient_checkpointing_and_bf16_train(bundle, text_file, tmp_path):
    _, b = bundle
    s = train(b, text_file, tmp_path / "gc", _cfg(max_steps=12, gradient_checkpointing=True, precision="bf16-mixed",
                                                  eval_split=0.1, eval_every=4), show_progress=False)  # fmt: skip
    assert s["eval_loss"] < s["eval_history"][0][1]
    s = train(b, text_file, tmp_path / "bf16", _cfg(max_steps=2, precision="bf16"), show_progress=False)
    assert s["steps"] == 2


def test_chat_and_instruction_data_train(bundle, tmp_path):
    _, b = bundle
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(40)]  # fmt: skip
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in rows))
    s = train(b, chat, tmp_path / "chat", _cfg(max_steps=2, seq_len=64), show_progress=False)
    assert s["data_format"] == "chat" and s["examples"] == 40
    inst = tmp_path / "inst.jsonl"
    inst.write_text("\n".join(json.dumps({"instruction": f"Count to {i}", "output": "1 2 3"}) for i in range(10)))
    s = train(b, inst, tmp_path / "inst", _cfg(max_steps=1, seq_len=64), show_progress=False)
    assert s["data_format"] == "instructions"


def test_training_on_an_nf4_bundle_lowers_loss_and_recovers(bundle, text_file, tmp_path):
    from loramkit.quant import quantize_bundle
    from loramkit.recover.adapter import recover_adapter

    base, b = bundle
    nf4 = tmp_path / "nf4"
    quantize_bundle(b, nf4, quant_type="nf4")
    s = train(nf4, text_file, tmp_path / "a", _cfg(max_steps=20, precision="bf16-mixed", eval_split=0.1, eval_every=10),
              show_progress=False)  # fmt: skip
    assert s["eval_loss"] < s["eval_history"][0][1] - 0.05, s["eval_history"]
    recover_adapter(tmp_path / "a", tmp_path / "full")
    peft_on_base(base, tmp_path / "full")  # any warning (missing keys) fails


def test_eval_command_measures_models_adapters_and_bundles(bundle, text_file, tmp_path, capsys):
    from loramkit.cli import run

    base, b = bundle
    train(b, text_file, tmp_path / "a", _cfg(max_steps=20), show_progress=False)
    assert run(["recover", str(tmp_path / "a"), "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()

    def ev(*args: str) -> dict:
        assert run(["eval", *args, "--data", str(text_file), "--seq-len", "32", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    plain, tuned = ev(str(base)), ev(str(base), "--adapter", str(tmp_path / "full"))
    pruned, pruned_tuned = ev(str(b)), ev(str(b), "--adapter", str(tmp_path / "a"))
    assert tuned["loss"] < plain["loss"] and pruned_tuned["loss"] < pruned["loss"]
    assert plain["tokens"] == tuned["tokens"] > 0 and 0 <= tuned["accuracy"] <= 1
    assert abs(plain["perplexity"] - 2.718281828 ** plain["loss"]) < 1e-6 * plain["perplexity"]
    # The un-recovered adapter does not fit the original model: a one-line refusal.
    assert run(["eval", str(base), "--adapter", str(tmp_path / "a"), "--data", str(text_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recover it first" in err[0]


@pytest.mark.parametrize(
    "option, value",
    [("--alpha", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"), ("--max-steps", "0"), ("--rank", "0"),
     ("--dropout", "1"), ("--epochs", "0"), ("--weight-decay", "-0.1"), ("--eval-split", "1"), ("--micro-batch", "0"),
     ("--warmup-steps", "-1"), ("--seq-len", "1")],
)  # fmt: skip
def test_cli_refuses_out_of_range_numbers_with_one_line_and_no_output(bundle, text_file, tmp_path, capsys, option, value):
    from loramkit.cli import run

    _, b = bundle
    rc = run(["train", str(b), "--data", str(text_file), "--out", str(tmp_path / "a"), "--max-steps", "1", option, value])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and err.startswith(f"error: {option} must be"), err
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def test_align_config_refuses_out_of_range_numbers():
    from loramkit.train.config import AlignConfig

    for kw, option in [(dict(lr=float("nan")), "--lr"), (dict(max_grad_norm=float("inf")), "--max-grad-norm"),
                       (dict(max_steps=0), "--max-steps"), (dict(tokens=0), "--tokens"), (dict(log_every=-1), "--log-every")]:  # fmt: skip
        with pytest.raises(LoramError, match=f"^{option} must be"):
            AlignConfig(**kw).check()
    AlignConfig().check()
    TrainConfig().check()


def test_resume_from_a_truncated_checkpoint_is_one_clear_error(bundle, text_file, tmp_path):
    from loramkit.train import checkpoint

    _, b = bundle
    train(b, text_file, tmp_path / "x", _cfg(max_steps=4, save_every=1), show_progress=False, stop_after=2)
    newest = checkpoint.latest(tmp_path / "x.ckpt")
    assert newest is not None
    weights = newest / checkpoint.TENSORS_NAME
    weights.write_bytes(weights.read_bytes()[:-40])  # a kill mid-copy, a full disk
    with pytest.raises(LoramError, match="unreadable checkpoint .*delete it"):
        train(b, text_file, tmp_path / "x", _cfg(max_steps=4, save_every=1), resume=True, show_progress=False)
