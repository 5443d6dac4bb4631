"""Training memory and speed: plain PEFT LoRA on the full model vs ``loramkit train`` on a
LoRAM bundle and on a QLoRAM (NF4) bundle, same data, same LoRA config, one run.

Uses the LLaMA-3.2-1B-shaped random base of bench/streaming.py (1.24B parameters,
bf16; its 262M-parameter tied embeddings are never pruned nor quantized) with a small
BPE tokenizer. Each run is its own process; peak memory is its VmHWM.

    .venv/bin/python bench/train_memory.py [--ratio 0.85] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine, peak_rss_of, pyplot  # noqa: E402
from _measure import measure as measure_child  # noqa: E402
from streaming import LLAMA_32_1B, write_base  # noqa: E402

from loramkit.demo import _tokenizer, general_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shapes", default="2x128,1x32", help="micro-batch x seq-len settings to measure")
    args = ap.parse_args()
    work, py = args.workdir, sys.executable
    base = work / "llama-3.2-1b-shape"
    if not (base / "config.json").exists():
        write_base(base, LLAMA_32_1B)
    if not (base / "tokenizer.json").exists():
        _tokenizer(general_texts(500, seed=0)).save_pretrained(base)
    data = work / "train.txt"
    data.write_text("\n\n".join(general_texts(400, seed=1)))
    bundle, nf4 = work / f"bundle-{args.ratio}", work / f"bundle-{args.ratio}-nf4"
    if not (bundle / "loram.json").exists():
        subprocess.run([py, "-m", "loramkit", "prune", str(base), "--out", str(bundle), "--ratio", str(args.ratio)], check=True)
    if not (nf4 / "loram.json").exists():
        subprocess.run(
            [py, "-m", "loramkit", "quantize", str(bundle), "--out", str(nf4), "--type", "nf4", "--overwrite"], check=True
        )

    floor, _ = peak_rss_of([py, "-c", "import loramkit.train.trainer, loramkit.quant, transformers, peft, bitsandbytes"])
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": f"LLaMA-3.2-1B shape (1.24B parameters, bf16), ratio {args.ratio}, {args.steps} steps",
        "import_floor_rss": floor,
        "shapes": {},
    }
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [f"# Training memory and speed ({result['date']}, {result['machine']})", "",
             f"{result['model']}; every run is its own process; import floor {mib(floor)}.", ""]  # fmt: skip
    for shape in args.shapes.split(","):
        mb, seq_len = (int(x) for x in shape.split("x"))
        runs = measure(py, base, data, bundle, nf4, args.steps, mb, seq_len, work)
        result["shapes"][shape] = runs
        ref = runs["PEFT LoRA, full model (bf16)"]
        gpu = ref.get("cuda_peak") is not None  # on a GPU machine: its peak and ratios
        lines += [f"## micro-batch {mb} x {seq_len} tokens", "",
                  "| run | peak RSS | above floor | vs PEFT LoRA (above floor) |"
                  + (" CUDA peak | vs PEFT LoRA (CUDA) |" if gpu else "") + " tokens/s | vs PEFT LoRA |",
                  "|---|---|---|---|" + ("---|---|" if gpu else "") + "---|---|"]  # fmt: skip
        for name, r in runs.items():
            cuda = f" {mib(r['cuda_peak'])} | {r['cuda_peak'] / ref['cuda_peak']:.2f}x |" if gpu else ""
            lines.append(
                f"| {name} | {mib(r['peak_rss'])} | {mib(r['peak_rss'] - floor)} | "
                f"{(r['peak_rss'] - floor) / (ref['peak_rss'] - floor):.2f}x |{cuda} {r['tokens_per_second']:,.1f} | "
                f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x |"
            )
        lines.append("")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "train_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    overhead = {shape: (runs["loramkit train, LoRAM bundle (bf16)"], runs["PEFT + HF Trainer, same LoRAM bundle"])
                for shape, runs in result["shapes"].items()}  # fmt: skip
    lines += ["loramkit's own overhead against PEFT + HF Trainer on the same pruned model (time per step, peak above floor):", ""]
    for shape, (ours, theirs) in overhead.items():
        lines.append(f"- {shape}: {theirs['tokens_per_second'] / ours['tokens_per_second']:.2f}x time per step, "
                     f"{(ours['peak_rss'] - floor) / (theirs['peak_rss'] - floor):.2f}x peak memory")  # fmt: skip
    (ROOT / "bench" / "results" / "train_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    chart(result, ROOT / "bench" / "results" / "train_memory.png")


def chart(result: dict, path: Path) -> None:
    """Peak memory and tokens/s of every run, one panel pair per batch shape."""
    plt = pyplot()
    if plt is None:
        return
    shapes = list(result["shapes"])
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.2 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        runs = result["shapes"][shape]
        names = list(runs)
        colors = ["tab:blue" if n.startswith("loramkit") else "tab:gray" for n in names]
        row[0].barh(names, [runs[n]["peak_rss"] / 2**20 for n in names], color=colors)
        row[0].axvline(result["import_floor_rss"] / 2**20, color="black", linestyle=":", label="import floor")
        row[0].set_xlabel(f"peak RSS (MiB), micro-batch x seq {shape}")
        row[0].invert_yaxis()
        row[0].legend()
        row[1].barh(names, [runs[n]["tokens_per_second"] for n in names], color=colors)
        row[1].set_xlabel("tokens/s")
        row[1].set_yticks([])
        row[1].invert_yaxis()
    fig.suptitle(f"{result['model']}: {result['date']}, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(py: str, base: Path, data: Path, bundle: Path, nf4: Path, steps: int, mb: int, seq_len: int, work: Path) -> dict:
    """Peak RSS and tokens/s of every run at one batch shape."""
    common = ["--max-steps", str(steps), "--micro-batch", str(mb), "--seq-len", str(seq_len),
              "--rank", "8", "--alpha", "16", "--overwrite"]  # fmt: skip
    runs = {}
    env = {"PYTHONPATH": str(ROOT)}

    def script(name: str, script_file: str, model: Path, *extra: str) -> None:
        out = work / f"{script_file}{''.join(extra)}.json"
        m = measure_child([py, str(ROOT / "bench" / script_file), str(model), str(data), str(steps), str(mb),
                     str(seq_len), str(out), *extra], env=env)  # fmt: skip
        runs[name] = {"peak_rss": m.rss, "cuda_peak": m.cuda, **json.loads(out.read_text())}

    def loramkit_train(name: str, b: Path) -> None:
        adapter = work / f"adapter-{b.name}"
        m = measure_child([py, "-m", "loramkit", "train", str(b), "--data", str(data), "--out", str(adapter), *common])
        s = json.loads((adapter / "loram_adapter.json").read_text())["training"]["summary"]
        runs[name] = {"peak_rss": m.rss, "cuda_peak": m.cuda, "steps": s["steps"], "tokens": s["tokens"],
                      "seconds": s["seconds"], "tokens_per_second": s["tokens_per_second"], "precision": s["precision"]}  # fmt: skip

    script("PEFT LoRA, full model (bf16)", "_peft_baseline.py", base)
    script("PEFT QLoRA, full model (NF4)", "_peft_baseline.py", base, "nf4")
    loramkit_train("loramkit train, LoRAM bundle (bf16)", bundle)
    script("PEFT + HF Trainer, same LoRAM bundle", "_hf_trainer_baseline.py", bundle)
    loramkit_train("loramkit train, QLoRAM bundle (NF4)", nf4)
    return runs


if __name__ == "__main__":
    main()
