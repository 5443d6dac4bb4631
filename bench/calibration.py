"""Taylor importance: the layer-streamed calibration engine against whole-model autograd.

Writes LLaMA-shaped bases of the same width at 8, 16 and 32 layers (bf16, random weights,
written tensor by tensor), then scores the pruned layers' units with first-order Taylor
importance in child processes, both ways, in float32 on the same calibration tokens:

- whole model: ``loramkit.prune.taylor.whole_model_taylor_scores`` (the model loaded with
  transformers, gradients accumulated over the micro-batches in ``.grad``);
- engine: ``loramkit.prune.calibration.calibrated_scores`` with every layer boundary on disk
  (``budget=0``: the engine's flat-memory setting) and, at the largest depth, with the
  default in-memory budget.

Each child reports its peak RSS (VmHWM); the floor is a child that imports the same modules.
The scores of both ways are compared (they are the same numbers up to float32 rounding).
A paper plan for LLaMA-3.1-70B at the default calibration is computed from its config.

    .venv/bin/python bench/calibration.py [--workdir bench/_work] [--depths 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_rss_of, pyplot  # noqa: E402
from streaming import write_base  # noqa: E402

WIDTH = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 2816, "max_position_embeddings": 4096,
    "num_attention_heads": 16, "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}  # fmt: skip
SAMPLES, SEQ_LEN, MICRO_BATCH = 8, 256, 4
KEEP_FIRST, KEEP_LAST = 4, 2

# Both ways import the model's transformers code (~100 MB of it): the floor does too.
IMPORTS = (
    "import torch, transformers, transformers.models.llama.modeling_llama, loramkit.prune.calibration, loramkit.prune.taylor"
)
CHILD = (
    IMPORTS
    + """
import json, sys, time
from pathlib import Path
from loramkit.families import ArchSpec
from loramkit.memory import return_large_blocks_to_os
from loramkit.prune.calibration import Calibration, EngineSettings, calibrated_scores
from loramkit.prune.taylor import whole_model_taylor_scores
return_large_blocks_to_os()
# (names unlike _measure's own globals: the code runs in its namespace)
way, base, scores_path, samples, seq_len, micro, budget, offload = sys.argv[1:9]
base = Path(base)
arch = ArchSpec.from_config(json.loads((base / "config.json").read_text()))
ids = torch.randint(0, arch.vocab_size, (int(samples), int(seq_len)), generator=torch.Generator().manual_seed(0))
calib = Calibration(ids, "0" * 64, "random tokens")
layers = list(range(%d, arch.num_hidden_layers - %d))
t0 = time.perf_counter()
if way == "whole":
    scores = whole_model_taylor_scores(base, arch, layers, calib, micro_batch=int(micro), dtype=torch.float32)
else:
    settings = EngineSettings(micro_batch=int(micro), budget=int(budget), offload_dir=Path(offload), show_progress=False)
    scores = calibrated_scores(base, arch, layers, calib, "taylor", settings)
torch.save({"scores": scores, "seconds": time.perf_counter() - t0}, scores_path)
"""
    % (KEEP_FIRST, KEEP_LAST)
)


def layer_bytes(c: dict, rows: int, seq_len: int, elt: int = 4) -> dict[str, int]:
    """The engine's working set from the shapes alone (compute dtype of ``elt`` bytes).

    layer: one decoder layer's weights; grads: their gradient accumulators (every scored
    projection) + the one gradient autograd hands over at a time (the largest projection);
    activations: what autograd keeps through one layer for one micro-batch (input, two normed
    copies, q/k/v and attention output, residual, gate, up, act(gate) and the product, and the
    attention probabilities of the math kernel); head: lm_head + final norm, with one span's
    logits, their log-softmax and both gradients (the engine runs the loss over spans of H/8 positions);
    embed: the embedding matrix, as read and in the compute dtype.
    """
    h, hd, inter, v = c["hidden_size"], c["head_dim"], c["intermediate_size"], c["vocab_size"]
    q, kv, heads = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["num_attention_heads"]
    proj = {"q": q * h, "k": kv * h, "v": kv * h, "o": h * q, "gate": inter * h, "up": inter * h, "down": h * inter}
    weights = sum(proj.values()) + 2 * h
    tokens = rows * seq_len
    return {
        "layer": weights * elt,
        "grads": (sum(proj.values()) + max(proj.values())) * elt,
        "activations": tokens * (4 * h + 2 * q + 2 * kv + 4 * inter + heads * seq_len) * elt,
        "head": (v * h + h + 5 * max(16, h // 8) * v) * elt,  # the loss runs over spans of H/8 positions
        "embed": v * h * (elt + 2),  # read in bf16, then cast
        "boundary": 0,  # set by the caller: N * T * H * elt per stored boundary
    }


def engine_bound(c: dict, samples: int, seq_len: int, micro: int, budget: int, elt: int = 4) -> int:
    """The issue's target: one layer (weights + grads) + one micro-batch's activations + the boundary budget,
    or the head / embedding step when that is larger (it runs alone, between the layers)."""
    b = layer_bytes(c, micro, seq_len, elt)
    boundary = samples * seq_len * c["hidden_size"] * elt
    in_memory = min(budget // boundary, c["num_hidden_layers"] + 1) * boundary if boundary else 0
    return max(b["layer"] + b["grads"] + b["activations"], b["head"], b["embed"]) + in_memory


def plan_70b(path: Path, samples: int = 128, seq_len: int = 512, micro: int = 4, budget: int = 4 << 30) -> dict:
    """Engine peak for LLaMA-3.1-70B at the default calibration, against the whole-model way, from shapes."""
    c = json.loads(path.read_text())
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    b = layer_bytes(c, micro, seq_len)
    L, h, v = c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    layer_params = b["layer"] // 4
    params = L * layer_params + 2 * v * h + h
    pruned = L - KEEP_FIRST - KEEP_LAST
    boundary = samples * seq_len * h * 4
    stored = L - KEEP_FIRST + 1  # inputs of layers from the first pruned one, and the last output
    return {
        "model": "LLaMA-3.1-70B", "params": params, "calibration": f"{samples} x {seq_len} tokens, micro-batch {micro}, fp32",
        "layer_weights": b["layer"], "layer_grads": b["grads"], "micro_batch_activations": b["activations"],
        "head_step": b["head"], "embed_step": b["embed"], "boundary_budget": budget,
        "engine_peak": engine_bound(c, samples, seq_len, micro, budget),
        "boundary_bytes_each": boundary, "boundaries_on_disk": stored * boundary - (budget // boundary) * boundary,
        "whole_model_bf16_weights": 2 * params,
        "whole_model_bf16_weights_and_grads": 2 * params + 2 * pruned * (layer_params - 2 * h),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    args = ap.parse_args()
    work, py = args.workdir, sys.executable
    offload = work / "offload"
    offload.mkdir(parents=True, exist_ok=True)
    floor, _ = peak_rss_of([py, "-c", IMPORTS])
    runs = []
    for depth in args.depths:
        config = dict(WIDTH, num_hidden_layers=depth)
        base = work / f"llama-w{config['hidden_size']}-l{depth}"
        if not (base / "config.json").exists():
            print(f"writing the {depth}-layer base ...", flush=True)
            write_base(base, config)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        ways = [("whole", "whole model", 0), ("engine", "engine, boundaries on disk", 0)]
        if depth == max(args.depths):
            ways.append(("engine", "engine, boundaries in memory (4 GiB budget)", 4 << 30))
        scores = {}
        for way, label, budget in ways:
            out = work / f"scores-{depth}-{len(scores)}.pt"
            rss, seconds = peak_rss_of(
                [
                    py,
                    "-c",
                    CHILD,
                    way,
                    str(base),
                    str(out),
                    str(SAMPLES),
                    str(SEQ_LEN),
                    str(MICRO_BATCH),
                    str(budget),
                    str(offload),
                ],
                {"PYTHONPATH": str(ROOT)},
            )
            result = torch.load(out, weights_only=True)  # tensors and a float: nothing to unpickle
            scores[label] = result["scores"]
            bound = None if way == "whole" else engine_bound(config, SAMPLES, SEQ_LEN, MICRO_BATCH, budget)
            runs.append({"layers": depth, "way": label, "peak_rss": rss, "above_floor": rss - floor, "seconds": seconds,
                         "compute_seconds": result["seconds"], "model_bytes": size, "bound": bound})  # fmt: skip
            print(f"{depth} layers, {label}: {(rss - floor) / 2**20:,.0f} MiB above floor, {seconds:.1f} s", flush=True)
        ref = scores["whole model"]
        for label, got in scores.items():
            worst = max(float((got[i][k] - ref[i][k]).abs().max() / ref[i][k].abs().max()) for i in ref for k in (0, 1))
            next(r for r in runs if r["layers"] == depth and r["way"] == label)["max_rel_diff_vs_whole"] = worst
    plan = plan_70b(Path("/work/shared/reference-configs/llama-3.1-70b.json"))
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
        "model": f"LLaMA shape, hidden {WIDTH['hidden_size']}, intermediate {WIDTH['intermediate_size']}, "
                 f"{WIDTH['num_attention_heads']}/{WIDTH['num_key_value_heads']} heads, vocab {WIDTH['vocab_size']}, bf16 checkpoint, random weights",
        "calibration": f"{SAMPLES} x {SEQ_LEN} tokens, micro-batch {MICRO_BATCH}, float32 compute; layers {KEEP_FIRST}..L-{KEEP_LAST + 1} scored",
        "import_floor_rss": floor,
        "runs": runs,
        "plan_70b": plan,
    }  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / "calibration.md")
    chart(result, out / "calibration.png")


def write_markdown(result: dict, path: Path) -> None:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
    md = [
        f"# Taylor importance: whole model vs layer-streamed engine ({result['date']}, {result['machine']})",
        "",
        f"Model: {result['model']}. Calibration: {result['calibration']}. Peak RSS is each process's VmHWM; "
        f"the import floor (torch, transformers with its LLaMA code, loramkit) is {mib(result['import_floor_rss'])}. "
        "Bound: the engine's target from the shapes (one layer's fp32 weights + gradient accumulators + one "
        "micro-batch's activations, or the lm_head step when larger, + boundaries held in memory).",
        "",
        "| layers | way | checkpoint | peak above floor | bound | time | vs whole model | scores vs whole model (max rel. diff) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        whole = next(w for w in result["runs"] if w["layers"] == r["layers"] and w["way"] == "whole model")
        bound = mib(r["bound"]) if r["bound"] is not None else ""
        md.append(
            f"| {r['layers']} | {r['way']} | {mib(r['model_bytes'])} | {mib(r['above_floor'])} | {bound} | "
            f"{r['seconds']:.1f} s | {r['seconds'] / whole['seconds']:.2f}x | {r['max_rel_diff_vs_whole']:.1e} |"
        )
    p = result["plan_70b"]
    md += [
        "",
        f"## Paper plan: {p['model']} ({p['params'] / 1e9:.1f}B parameters), {p['calibration']}",
        "",
        "| | bytes |",
        "|---|---|",
        f"| one decoder layer, fp32 weights | {gb(p['layer_weights'])} |",
        f"| its gradient accumulators + one gradient in flight | {gb(p['layer_grads'])} |",
        f"| one micro-batch's activations through it | {gb(p['micro_batch_activations'])} |",
        f"| lm_head step (fp32 lm_head + logits and their gradient) | {gb(p['head_step'])} |",
        f"| boundary budget in memory | {gb(p['boundary_budget'])} |",
        f"| **engine peak** | **{gb(p['engine_peak'])}** |",
        f"| boundaries on disk (under --offload-dir), {gb(p['boundary_bytes_each'])} each | {gb(p['boundaries_on_disk'])} |",
        f"| whole model, bf16 weights alone | {gb(p['whole_model_bf16_weights'])} |",
        f"| whole model, bf16 weights + gradients of the pruned layers | {gb(p['whole_model_bf16_weights_and_grads'])} |",
    ]
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def chart(result: dict, path: Path) -> None:
    """Peak above floor and time against depth, one line per way."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ways = list(dict.fromkeys(r["way"] for r in result["runs"]))
    for way in ways:
        rs = [r for r in result["runs"] if r["way"] == way]
        style = dict(marker="o", color="tab:gray" if way == "whole model" else None)
        ax1.plot([r["layers"] for r in rs], [r["above_floor"] / 2**20 for r in rs], label=way, **style)
        ax2.plot([r["layers"] for r in rs], [r["seconds"] for r in rs], label=way, **style)
    bounds = [r for r in result["runs"] if r["way"] == "engine, boundaries on disk"]
    ax1.plot(
        [r["layers"] for r in bounds],
        [r["bound"] / 2**20 for r in bounds],
        linestyle="--",
        color="tab:red",
        label="engine bound (disk)",
    )
    ax1.set_xlabel("decoder layers")
    ax1.set_ylabel("peak RSS above import floor (MiB)")
    ax1.legend()
    ax2.set_xlabel("decoder layers")
    ax2.set_ylabel("seconds per run")
    ax2.legend()
    fig.suptitle(f"Taylor importance, {result['date']}, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
