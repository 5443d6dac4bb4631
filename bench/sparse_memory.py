"""Training memory and speed of LoRAM-Unst and LoRAM-Semi trained compressed, against the same
masks zero-filled in dense weights (the paper's way) and plain PEFT LoRA on the dense model
(issue 11, Memory).

The LLaMA-3.2-1B-shaped random bf16 base of bench/streaming.py (1.24B parameters; 262M of them
are the tied embeddings, which no strategy sparsifies). Magnitude pruning (memory does not
depend on which weights are kept) of the seven projections of all 16 layers
(``--keep-first 0 --keep-last 0``, as the paper counts its Table 1 ratios): unstructured 0.5
and 2:4. Every run is its own process running the same loop: PEFT LoRA r=8 on the seven
projections, AdamW, ``--precision auto`` (bf16 autocast with bf16 frozen weights where the
hardware computes bf16 natively; this is recorded). Peak RSS (VmHWM) above an import floor
that imports the same libraries. Every child fixes glibc's mmap threshold first
(``loramkit.memory.return_large_blocks_to_os``, as loramkit's streaming commands do): a
compressed forward allocates and frees a dense weight per projection, which glibc's rising
threshold would otherwise serve from a fragmenting heap (without it the compressed peak was
~380 MiB higher in a trial run); the dense runs get the same treatment.

    .venv/bin/python bench/sparse_memory.py [--steps 2] [--seq-len 64] [--micro-batch 1]

The child mode (``--child KIND MODEL TOKENIZER DATA STEPS MB SEQ OUT``) is one measured run:
KIND is ``dense`` (MODEL a base), ``compressed`` or ``zero-filled`` (MODEL a sparse bundle,
``load_pruned_model(..., sparse="compressed" | "dense")``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = ("dense", "compressed", "zero-filled")
# The libraries every child imports, for the floor (the LLaMA modeling code included).
IMPORTS = (
    "import peft, transformers, transformers.models.llama.modeling_llama, loramkit.model.loader, loramkit.model.sparse, "
    "loramkit.train.data, loramkit.train.loop, loramkit.precision"
)
STRATEGIES = {  # run name -> prune arguments
    "LoRAM-Unst 0.5": ["--strategy", "unstructured", "--ratio", "0.5"],
    "LoRAM-Semi 2:4": ["--strategy", "semi-structured", "--pattern", "2:4"],
}


def _status_bytes(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmRSS: resident now, VmHWM: peak so far)."""
    lines = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f: int(lines[f].split()[0]) * 1024 for f in fields}


def child(kind: str, model_path: str, tokenizer: str, data: str, steps: int, mb: int, seq_len: int, out: str) -> None:
    """One measured training run (the loop of bench/_peft_baseline.py, any of the three models)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramkit.memory import return_large_blocks_to_os
    from loramkit.model.loader import load_pruned_model
    from loramkit.precision import resolve_precision
    from loramkit.train.data import collate, load_examples
    from loramkit.train.loop import BatchPlan, pick_device

    return_large_blocks_to_os()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    examples, _ = load_examples(data, tok, seq_len)
    device = pick_device(None, 1)
    prec = resolve_precision("auto", device)
    if kind == "dense":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=prec.compute_dtype).to(device)
    else:
        sparse = "compressed" if kind == "compressed" else "dense"
        model = load_pruned_model(model_path, dtype=prec.compute_dtype, device=device, sparse=sparse)
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    loaded = _status_bytes("VmRSS", "VmHWM")  # after loading: what the model holds, and the load's own peak
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    plan = BatchPlan(len(examples), mb, 1, 1, 0)
    model.train()
    seconds, tokens, step_peaks = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in plan.micro_batches(step, 0)[0]], tok.pad_token_id or 0).items()}  # fmt: skip
        with torch.autocast(device.type, dtype=prec.autocast_dtype or torch.bfloat16, enabled=prec.autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens.append(int(batch["attention_mask"].sum()))  # a device sync, as loramkit's loss.item()
        seconds.append(time.perf_counter() - t0)
        step_peaks.append(_status_bytes("VmHWM")["VmHWM"])
    later = slice(1, None) if steps > 1 else slice(None)  # the first step warms up kernels and the allocator
    result = {
        "kind": kind,
        "precision": prec.describe(),
        "weights_resident": resident,
        "rss_after_load": loaded["VmRSS"],
        "peak_rss_during_load": loaded["VmHWM"],
        "peak_rss_after_each_step": step_peaks,
        "steps": steps,
        "tokens": sum(tokens),
        "step_seconds": seconds,
        "tokens_per_second": sum(tokens) / sum(seconds),
        "tokens_per_second_after_first": sum(tokens[later]) / sum(seconds[later]),
        "final_loss": loss.item(),
    }
    Path(out).write_text(json.dumps(result))


def main() -> None:
    from _measure import machine, peak_rss_of
    from _measure import measure as measure_child
    from streaming import LLAMA_32_1B, write_base

    from loramkit.demo import _tokenizer, general_texts
    from loramkit.planner import plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=1)
    args = ap.parse_args()
    work, py = args.workdir, sys.executable
    base = work / "llama-3.2-1b-shape"
    if not (base / "config.json").exists():
        write_base(base, LLAMA_32_1B)
    if not (base / "tokenizer.json").exists():
        _tokenizer(general_texts(500, seed=0)).save_pretrained(base)
    data = work / "sparse-train.txt"
    data.write_text("\n\n".join(general_texts(100, seed=1)))
    bundles = {}
    for name, how in STRATEGIES.items():
        bundles[name] = work / f"sparse-{name.split()[0].lower()}-{name.split()[1].replace(':', 'of')}"
        if not (bundles[name] / "loram.json").exists():
            subprocess.run([py, "-m", "loramkit", "prune", str(base), "--out", str(bundles[name]), *how, "--importance",
                            "magnitude", "--keep-first", "0", "--keep-last", "0", "--overwrite"], check=True)  # fmt: skip

    load, started = [os.getloadavg()[0]], time.perf_counter()  # tokens/s on a shared machine depend on it
    floor, _ = peak_rss_of([py, "-c", IMPORTS], env={"PYTHONPATH": str(ROOT)})
    runs: dict[str, dict] = {}

    def run(name: str, kind: str, model: Path) -> None:
        out = work / f"sparse-memory-{len(runs)}.json"
        m = measure_child([py, str(Path(__file__).resolve()), "--child", kind, str(model), str(base), str(data),
                           str(args.steps), str(args.micro_batch), str(args.seq_len), str(out)], env={"PYTHONPATH": str(ROOT)})  # fmt: skip
        runs[name] = {"peak_rss": m.rss, "cuda_peak": m.cuda, "wall_seconds": m.seconds, **json.loads(out.read_text())}
        out.unlink()
        print(f"{name}: peak {m.rss / 2**20:,.0f} MiB ({(m.rss - floor) / 2**20:,.0f} above the floor), "
              f"{runs[name]['tokens_per_second_after_first']:.1f} tokens/s", flush=True)  # fmt: skip

    run("PEFT LoRA, dense model", "dense", base)
    for name, bundle in bundles.items():
        run(f"{name}, compressed", "compressed", bundle)
        run(f"{name}, zero-filled dense", "zero-filled", bundle)
    load.append(os.getloadavg()[0])

    config = json.loads((base / "config.json").read_text())
    planned = {
        name: plan(config, 0.5 if "Unst" in name else None, strategy=how[1], pattern=None if "Unst" in name else "2:4",
                   keep_first=0, keep_last=0, seq_len=args.seq_len, batch=args.micro_batch)
        for name, how in STRATEGIES.items()
    }  # fmt: skip
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": f"LLaMA-3.2-1B shape (1.24B parameters, bf16 checkpoint, random weights), all 16 layers sparsified "
        f"(magnitude), {args.steps} steps of micro-batch {args.micro_batch} x {args.seq_len} tokens, LoRA r=8 on 7 projections",
        "import_floor_rss": floor,
        "load_average_1min": load,  # at the start and the end of the runs
        "runs_seconds": time.perf_counter() - started,
        "runs": runs,
        "planner_weight_bytes": {name: {m["method"]: m["storage_real"] for m in p["methods"]} for name, p in planned.items()},
        "compressed_vs_zero_filled_above_floor": {
            name: (runs[f"{name}, compressed"]["peak_rss"] - floor) / (runs[f"{name}, zero-filled dense"]["peak_rss"] - floor)
            for name in STRATEGIES
        },
    }
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "sparse_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (ROOT / "bench" / "results" / "sparse_memory.md").write_text(md)
    print(md)


def report(result: dict) -> str:
    """The Markdown table (peak above the floor, time per step, tokens/s of every run) and the ratios
    against the paper's way: the target (compressed <= 0.65x of zero-filled above the floor) and
    the time the expansions add to each step."""
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    floor, runs = result["import_floor_rss"], result["runs"]
    precision = next(iter(runs.values()))["precision"]
    load = result.get("load_average_1min")
    busy = f" 1-min load average {load[0]:.1f} -> {load[-1]:.1f} ({result['runs_seconds'] / 60:.0f} min)." if load else ""
    lines = [f"# Sparse training memory ({result['date']}, {result['machine']})", "",
             f"{result['model']}; precision {precision}; every run is its own process; import floor {mib(floor)}.{busy}", "",
             "| run | weights in memory | peak RSS | above floor | vs zero-filled | s / step (after step 1) | tokens/s | vs zero-filled |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in runs.items():
        strategy = next((s for s in STRATEGIES if name.startswith(s)), None)
        ref = runs[f"{strategy}, zero-filled dense"] if strategy else None
        vs_mem = f"{(r['peak_rss'] - floor) / (ref['peak_rss'] - floor):.2f}x" if ref else ""
        vs_speed = f"{r['tokens_per_second_after_first'] / ref['tokens_per_second_after_first']:.2f}x" if ref else ""
        lines.append(f"| {name} | {mib(r['weights_resident'])} | {mib(r['peak_rss'])} | {mib(r['peak_rss'] - floor)} | "
                     f"{vs_mem} | {_after_first(r):.1f} | {r['tokens_per_second_after_first']:,.2f} | {vs_speed} |")  # fmt: skip
    lines += ["", "Compressed against zero-filled dense (the paper's way), same masks:", ""]
    for name in STRATEGIES:
        c, z = runs[f"{name}, compressed"], runs[f"{name}, zero-filled dense"]
        planned = result["planner_weight_bytes"][name]
        lines.append(
            f"- {name}: peak above the floor {result['compressed_vs_zero_filled_above_floor'][name]:.2f}x (target <= 0.65x); "
            f"weights alone {c['weights_resident'] / z['weights_resident']:.2f}x ({mib(c['weights_resident'])}; "
            f"`loramkit plan` says {mib(planned[name.split()[0]])}); the expansions add "
            f"{_after_first(c) - _after_first(z):.1f} s to every step whatever its tokens."
        )
    return "\n".join(lines) + "\n"


def _after_first(run: dict) -> float:
    """Seconds per step after the first (the first warms kernels and the allocator up)."""
    later = run["step_seconds"][1:] or run["step_seconds"]
    return sum(later) / len(later)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        kind, model, tokenizer, data, steps, mb, seq_len, out = sys.argv[2:10]
        child(kind, model, tokenizer, data, int(steps), int(mb), int(seq_len), out)
    else:
        main()
