"""loramkit plan: the paper's published counts, and real 4-bit bytes equal to a real bundle's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramkit.cli import run
from loramkit.planner import plan

DATA = Path(__file__).parent / "data"


def _config(name: str) -> dict:
    path = next(p for p in DATA.rglob(f"{name}*.json"))
    return json.loads(path.read_text())


def _row(p: dict, method: str) -> dict:
    return next(m for m in p["methods"] if m["method"] == method)


@pytest.mark.parametrize(
    ("model", "ratio", "quantized", "ratio_expected"),
    [("llama-3.1-70b", 0.85, True, 15.81), ("llama-2-70b", 0.85, True, 16.95), ("llama-2-70b", 0.75, True, 12.84),
     ("llama-2-13b", 0.65, False, 2.17)],
)  # fmt: skip
def test_reproduces_the_papers_storage_ratios(model, ratio, quantized, ratio_expected):
    p = plan(_config(model), ratio)
    row = _row(p, "QLoRAM" if quantized else "LoRAM")
    assert round(row["reduction_theoretical"], 2) == ratio_expected
    if model == "llama-3.1-70b":
        assert p["pruned_parameters"] == 17_849_982_976 and p["original_parameters"] == 70_553_706_496
    # Real 4-bit bytes are above the theoretical quarter (block constants, 16-bit embeddings).
    assert row["storage_real"] >= row["storage_theoretical"]


def test_memory_orders_the_methods_and_checkpointing_helps():
    p = plan(_config("llama-3.1-70b"), 0.85, seq_len=1024, batch=2)
    mem = {m["method"]: m["train_memory"] for m in p["methods"]}
    assert mem["QLoRAM"] < mem["LoRAM"] < mem["LoRA"] < mem["full fine-tuning"]
    assert mem["QLoRAM"] < mem["QLoRA"] < mem["LoRA"]
    for m in p["methods"]:
        assert m["train_memory_checkpointed"] < m["train_memory"]


def test_real_four_bit_bytes_equal_a_real_bundle(make_base_dir, tmp_path):
    from loramkit.bundle import Bundle
    from loramkit.prune.pruner import prune
    from loramkit.quant import quantize_bundle

    base = make_base_dir("llama_gqa")
    prune(base, tmp_path / "b", 0.5, keep_first=2, keep_last=1, show_progress=False)
    quantize_bundle(tmp_path / "b", tmp_path / "q", quant_type="nf4", double_quant=True)
    config = json.loads((base / "config.json").read_text())
    row = _row(plan(config, 0.5, keep_first=2, keep_last=1), "QLoRAM")
    with Bundle(tmp_path / "q").weights() as ckpt:  # tensor data, without the JSON quant_state blobs
        stored = sum(ckpt.info(n).nbytes for n in ckpt.names() if "quant_state" not in n)
    assert row["storage_real"] == stored
    assert row["parameters"] == Bundle(tmp_path / "q").manifest["parameters"]["pruned"]


def test_cli_plan_reads_a_config_a_model_dir_and_prints_json(make_base_dir, capsys):
    path = next(DATA.rglob("llama-2-13b*.json"))
    assert run(["plan", str(path), "--ratio", "0.65"]) == 0
    assert "2.17x" in capsys.readouterr().out
    assert run(["plan", str(make_base_dir("qwen3")), "--ratio", "0.5", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["architecture"] == "Qwen3ForCausalLM" and len(p["methods"]) == 5
    assert run(["plan", "no/such-file.json", "--ratio", "0.5"]) == 1


def test_inspect_shows_the_plan_with_the_bundles_actual_bytes(make_base_dir, tmp_path, capsys):
    from loramkit.prune.pruner import prune

    prune(make_base_dir("mistral"), tmp_path / "b", 0.5, show_progress=False)
    assert run(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "this bundle" in out and "QLoRAM" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("│ LoRAM"))
    weights = sum(p.stat().st_size for p in (tmp_path / "b").glob("model*.safetensors"))
    assert f"{weights / 2**20:,.1f} MiB" in line
