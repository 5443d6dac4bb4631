"""Training cost of the replication's rows, measured back to back in one run.

The replication table's memory and time columns come from the runs that measured each row,
which can be days and loramkit versions apart. This script trains one seed of the rows
compared in the reading (large + LoRA, LoRAM-Stru 0.5, LoRAM-Semi 2:4, LoRAM-Unst 0.5) one
after the other, with the table's exact `loramkit train` command, and reports each against
large + LoRA measured in the same run: peak RSS of the process (VmHWM) and the training
loop's time. Loading a sparse bundle fixes glibc's mmap threshold at 1 MiB
(`loramkit.memory`), which alone lowers peak RSS; the two dense rows are measured again
with the same allocator setting (`GLIBC_TUNABLES`), to separate the two effects.

It reuses `bench/_work/replicate/` (run replicate.py first; bundles it lacks are pruned with
replicate.py's arguments) and keeps each measured row in `cost/rows.json` there, so an
interrupted run resumes (delete that file to measure again).

    .venv/bin/python bench/replicate/train_cost.py      # about 30 min on 2 CPU cores
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _measure import run_measured

from loramkit.memory import MMAP_THRESHOLD

WORK = ROOT / "bench" / "_work" / "replicate"
OUT = ROOT / "bench" / "results" / "replication-train-cost.json"
CALIBRATION = ["--calibration", str(WORK / "data" / "calibration.txt")]
ROWS = {  # name: the prune arguments replicate.py uses for it (keep 1/1, seed 0)
    "large-full": ["--ratio", "0.0", "--importance", "magnitude"],
    "stru-0.5": ["--ratio", "0.5", "--importance", "taylor", *CALIBRATION],
    "semi-2:4": ["--strategy", "semi-structured", "--pattern", "2:4", "--importance", "sparsegpt", *CALIBRATION],
    "unst-0.5": ["--strategy", "unstructured", "--ratio", "0.5", "--importance", "sparsegpt", *CALIBRATION],
}
MMAP = {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"}  # what loading a sparse bundle sets
RUNS = {  # row: (bundle, environment)
    "large-full": ("large-full", {}),
    "stru-0.5": ("stru-0.5", {}),
    "semi-2:4": ("semi-2:4", {}),
    "unst-0.5": ("unst-0.5", {}),
    "large-full, 1 MiB mmap threshold": ("large-full", MMAP),
    "stru-0.5, 1 MiB mmap threshold": ("stru-0.5", MMAP),
}
TRAIN = ["--rank", "8", "--alpha", "16.0", "--max-steps", "64", "--lr", "0.002", "--warmup-steps", "10", "--micro-batch", "8",
         "--seq-len", "256", "--seed", "0", "--precision", "fp32", "--overwrite"]  # fmt: skip


def loramkit(*args: str, env: dict[str, str] | None = None) -> tuple[int, float]:
    peak, seconds, _ = run_measured([sys.executable, "-m", "loramkit", *args], env)
    return peak, seconds


def main() -> None:
    if not (WORK / "large").is_dir():
        raise SystemExit(f"{WORK} has no large model: run bench/replicate/replicate.py first")
    state = WORK / "cost" / "rows.json"
    rows = json.loads(state.read_text()) if state.is_file() else {}
    for name, (bundle_name, env) in RUNS.items():
        if name in rows:
            continue
        bundle = WORK / "bundles" / bundle_name
        if not (bundle / "loram.json").is_file():
            loramkit("prune", str(WORK / "large"), "--out", str(bundle), *ROWS[bundle_name], "--seed", "0",
                     "--keep-first", "1", "--keep-last", "1", "--overwrite")  # fmt: skip
        adapter = WORK / "cost" / bundle_name
        peak, wall = loramkit("train", str(bundle), "--data", str(WORK / "data" / "task-train.txt"), "--out", str(adapter),
                              "--eval-data", str(WORK / "data" / "task-heldout.txt"), *TRAIN, env=env)  # fmt: skip
        summary = json.loads((adapter / "loram_adapter.json").read_text())["training"]["summary"]
        rows[name] = {"peak_rss_bytes": peak, "train_seconds": summary["seconds"], "process_seconds": round(wall, 1),
                      "eval_loss": summary["eval_loss"], "environment": env}  # fmt: skip
        state.write_text(json.dumps(rows, indent=1))
        print(f"{name:>10}: peak RSS {peak / 2**20:,.0f} MiB, training loop {summary['seconds']:.0f} s", flush=True)
    base = rows["large-full"]
    for r in rows.values():
        r["rss_vs_large_lora"] = round(r["peak_rss_bytes"] / base["peak_rss_bytes"], 3)
        r["time_vs_large_lora"] = round(r["train_seconds"] / base["train_seconds"], 3)
    OUT.write_text(json.dumps({"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                               "command": "loramkit train BUNDLE " + " ".join(TRAIN), "rows": rows}, indent=1) + "\n")  # fmt: skip
    print("\n| row | peak RSS | vs large + LoRA | training loop | vs large + LoRA |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['rss_vs_large_lora']:.2f}x | {r['train_seconds']:.0f} s "
              f"| {r['time_vs_large_lora']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
