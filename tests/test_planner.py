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


# ---------------------------------------------------------------------------- non-structured strategies

# LLaMA-2-13B by hand: every layer has q, k, v, o [5120, 5120] and gate, up [13824, 5120], down [5120, 13824];
# embeddings and lm_head [32000, 5120], 81 norms of 5120 (two per layer and the final one).
L13_PROJECTIONS = [(5120, 5120)] * 4 + [(13824, 5120)] * 2 + [(5120, 13824)]
L13_REST = 2 * 32000 * 5120 + 81 * 5120
L13_FULL = 40 * sum(o * i for o, i in L13_PROJECTIONS) + L13_REST


def _sparse(model: str, **kw) -> dict:
    return plan(_config(model), kw.pop("ratio", None), keep_first=kw.pop("keep_first", 0), keep_last=kw.pop("keep_last", 0),
                **kw)  # fmt: skip


def test_sparse_rows_reproduce_the_papers_table_1_llama2_13b():
    """Table 1: Semi 1.95x, Unst 2.16x at 0.55, every projection of all 40 layers sparsified."""
    assert L13_FULL == 13_015_864_320
    semi = _sparse("llama-2-13b", strategy="semi-structured", pattern="2:4")
    unst = _sparse("llama-2-13b", strategy="unstructured", ratio=0.55)
    half = 40 * sum(o * i // 2 for o, i in L13_PROJECTIONS)
    assert semi["pruned_parameters"] == half + L13_REST == 6_671_979_520
    assert unst["pruned_parameters"] == 40 * sum(o * i * 45 // 100 for o, i in L13_PROJECTIONS) + L13_REST == 6_037_591_040
    assert semi["pruned_layers"] == unst["pruned_layers"] == list(range(40))
    assert f"{_row(semi, 'LoRAM-Semi')['reduction_theoretical']:.2f}" == "1.95"
    assert f"{_row(unst, 'LoRAM-Unst')['reduction_theoretical']:.2f}" == "2.16"
    # The paper's own counts are not what these rules give (planner docstring): 1.93x for Semi
    # from 6,738,415,616 parameters, and 6,037,628,912 for Unst (2.16x all the same).
    assert f"{L13_FULL / 6_738_415_616:.2f}" == "1.93" and semi["pruned_parameters"] != 6_738_415_616
    assert f"{L13_FULL / 6_037_628_912:.2f}" == "2.16" and unst["pruned_parameters"] != 6_037_628_912
    # The default 4 + 2 intact layers are further from the paper.
    default = plan(_config("llama-2-13b"), None, strategy="semi-structured", pattern="2:4")
    assert f"{L13_FULL / default['pruned_parameters']:.2f}" == "1.71"


@pytest.mark.parametrize(
    ("importance", "kept_per_layer"),
    [
        ("magnitude", sum(o * i - o * i * 55 // 100 for o, i in L13_PROJECTIONS)),  # one group per matrix (exact here)
        ("wanda", sum(o * (i - i * 55 // 100) for o, i in L13_PROJECTIONS)),  # per row: 7,603 of 13,824 removed
        ("sparsegpt", sum(i // 128 * (o * 128 - o * 128 * 55 // 100) for o, i in L13_PROJECTIONS)),  # per 128-column block
    ],
)
def test_unstructured_kept_counts_follow_each_importances_comparison_groups(importance, kept_per_layer):
    p = _sparse("llama-2-13b", strategy="unstructured", ratio=0.55, importance=importance)
    assert p["pruned_parameters"] == 40 * kept_per_layer + L13_REST
    assert p["sparse_weights"]["kept"] == 40 * kept_per_layer


def test_sparse_kept_rounds_down_what_each_group_removes():
    """A shape whose groups do not divide evenly: 7 x 300 at 0.55 (and a last SparseGPT block of 44 columns)."""
    from fractions import Fraction

    from loramkit.planner import sparse_kept

    r = Fraction(11, 20)
    assert sparse_kept((7, 300), r, "magnitude", None) == 2100 - 1155  # 2100 * 0.55 = 1155 exactly
    assert sparse_kept((7, 301), r, "magnitude", None) == 2107 - 1158  # 1158.85 -> 1158 removed
    assert sparse_kept((7, 301), r, "wanda", None) == 7 * (301 - 165)  # 165.55 -> 165 per row
    # blocks of 7 x 128 (492.8 -> 492 removed) and a last one of 7 x 44 (169.4 -> 169)
    assert sparse_kept((7, 300), r, "sparsegpt", None) == 2 * (896 - 492) + (308 - 169)
    assert sparse_kept((7, 300), Fraction(1, 3), "sparsegpt", None) == 2 * (896 - 298) + (308 - 102)
    assert sparse_kept((6, 300), r, "wanda", (2, 4)) == sparse_kept((6, 300), r, "sparsegpt", (2, 4)) == 6 * 150
    assert sparse_kept((6, 12), Fraction(2, 3), "magnitude", (1, 3)) == 6 * 4


def test_semi_structured_ratio_may_be_given_as_the_float_nearest_one_minus_n_over_m():
    p = _sparse("llama-2-13b", strategy="semi-structured", pattern="1:4", ratio=0.75)
    assert p["ratio"] == 0.75 and p["pattern"] == "1:4"
    from fractions import Fraction

    from loramkit.planner import sparse_ratio

    assert sparse_ratio("semi-structured", repr(2 / 3), "1:3") == (Fraction(2, 3), (1, 3))  # 2/3 has no exact decimal


def test_sparse_real_bytes_are_values_masks_and_the_dense_rest():
    p = _sparse("llama-2-13b", strategy="semi-structured", pattern="2:4")
    masks = 40 * sum(o * (i // 8) for o, i in L13_PROJECTIONS)  # one bit per weight, 5120 and 13824 are multiples of 8
    compressed, zero_filled = _row(p, "LoRAM-Semi"), _row(p, "LoRAM-Semi (zero-filled)")
    assert p["sparse_weights"]["mask_bytes"] == masks
    assert compressed["storage_real"] == 2 * p["pruned_parameters"] + masks
    assert compressed["storage_theoretical"] == zero_filled["storage_theoretical"] == 2 * p["pruned_parameters"]
    # The paper's way holds the dense tensors: the real bytes and training memory of LoRA itself.
    lora = _row(p, "LoRA")
    assert zero_filled["storage_real"] == lora["storage_real"] == 2 * L13_FULL
    assert zero_filled["train_memory"] == lora["train_memory"]
    assert zero_filled["trainable"] == compressed["trainable"] == lora["trainable"]
    # Compressed: the weights it saves, less the one projection expanded at a time (16-bit, dense).
    saved = 2 * L13_FULL - compressed["storage_real"]
    assert lora["train_memory"] - compressed["train_memory"] == saved - 2 * 13824 * 5120
    assert [m["method"] for m in p["methods"]] == ["full fine-tuning", "LoRA", "QLoRA", "LoRAM-Semi", "LoRAM-Semi (zero-filled)"]


def test_sparse_layers_follow_keep_first_and_keep_last():
    cfg = _config("llama-3.2-1b")
    p = plan(cfg, 0.5, strategy="unstructured")  # 16 layers: 4 and 2 intact by default
    assert p["pruned_layers"] == list(range(4, 14)) and (p["keep_first"], p["keep_last"]) == (4, 2)
    dense = plan(cfg, 0.5, strategy="structured", keep_first=0, keep_last=0)["original_parameters"]
    assert p["original_parameters"] == dense
    assert p["pruned_parameters"] == dense - p["sparse_weights"]["dense"] + p["sparse_weights"]["kept"]
    assert p["sparse_weights"]["kept"] * 2 == p["sparse_weights"]["dense"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(strategy="unstructured"), "takes --ratio"),
        (dict(strategy="unstructured", ratio=0.5, pattern="2:4"), "not --pattern"),
        (dict(strategy="semi-structured"), "takes --pattern"),
        (dict(strategy="semi-structured", pattern="2:4", ratio=0.25), "contradicts --pattern 2:4"),
        (dict(strategy="semi-structured", pattern="4:2"), "is not N:M"),
        (dict(strategy="semi-structured", pattern="3:7"), "multiples of 7"),
        (dict(strategy="unstructured", ratio=0.5, importance="taylor"), "importance 'taylor'"),
        (dict(strategy="diagonal", ratio=0.5), "strategy 'diagonal'"),
    ],
)
def test_sparse_plan_refuses_in_one_line(kw, message):
    from loramkit.errors import LoramError

    with pytest.raises(LoramError, match=message) as exc:
        plan(_config("llama-2-13b"), kw.pop("ratio", None), **kw)
    assert "\n" not in str(exc.value)


def test_sparse_plan_refuses_a_mixture_of_experts():
    from loramkit.errors import LoramError

    with pytest.raises(LoramError, match="mixtures of experts"):
        plan(_config("qwen3-30b-a3b"), 0.5, strategy="unstructured")


def test_cli_plan_sparse_rows(capsys):
    path = DATA / "llama-2-13b.json"
    paper = ["--keep-first", "0", "--keep-last", "0"]
    assert run(["plan", str(path), "--strategy", "semi-structured", "--pattern", "2:4", *paper]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("│ LoRAM-Semi "))
    assert "6,671,979,520" in row and "1.95x" in row
    assert run(["plan", str(path), "--strategy", "unstructured", "--ratio", "0.55", *paper, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["strategy"] == "unstructured" and p["importance"] == "magnitude" and p["pruned_parameters"] == 6_037_591_040
    assert run(["plan", str(path), "--strategy", "semi-structured", "--pattern", "2:4", "--ratio", "0.3"]) == 1
    assert run(["plan", str(path), "--pattern", "2:4"]) == 1  # structured takes a ratio, not a pattern
    assert run(["plan", str(path), "--strategy", "sideways", "--ratio", "0.5"]) == 1


@pytest.mark.parametrize(
    ("kw", "method"),
    [
        (dict(strategy="unstructured", ratio=0.55, importance="magnitude"), "LoRAM-Unst"),
        (dict(strategy="unstructured", ratio=0.55, importance="wanda"), "LoRAM-Unst"),
        (dict(strategy="unstructured", ratio=0.55, importance="sparsegpt"), "LoRAM-Unst"),
        (dict(strategy="semi-structured", ratio=None, pattern="2:4", importance="magnitude"), "LoRAM-Semi"),
    ],
    ids=["magnitude", "wanda", "sparsegpt", "2:4"],
)
def test_sparse_rows_equal_a_real_bundle(make_base_dir, tmp_path, kw, method):
    """The planner's kept counts and compressed bytes are the pruner's, on shapes where the groups
    do not divide evenly (q 256 x 64, gate 172 x 64, down 64 x 172: a last SparseGPT block of 44)."""
    import torch

    from loramkit.bundle import Bundle
    from loramkit.prune.pruner import prune

    base = make_base_dir("llama_gqa", dtype=torch.bfloat16)
    calibration = tmp_path / "calib.txt"
    calibration.write_text("\n\n".join(f"sample text number {i} for the calibration of a sparse bundle" for i in range(8)))
    calibrated = kw["importance"] != "magnitude"
    extra = dict(calibration=calibration, calibration_samples=3, calibration_seq_len=16) if calibrated else {}
    kw = dict(kw)
    m = prune(base, tmp_path / "b", kw.pop("ratio"), keep_first=2, keep_last=1, show_progress=False, **kw, **extra)
    p = plan(json.loads((base / "config.json").read_text()), m["pruning"]["ratio"], keep_first=2, keep_last=1, **kw)
    assert p["pruned_layers"] == m["pruning"]["pruned_layers"]
    assert p["pruned_parameters"] == m["parameters"]["pruned"] and p["original_parameters"] == m["parameters"]["original"]
    with Bundle(tmp_path / "b").weights() as ckpt:
        stored = sum(ckpt.info(n).nbytes for n in ckpt.names())
    assert _row(p, method)["storage_real"] == stored
