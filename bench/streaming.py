"""Peak memory of streaming pruning (and merging) on a >= 1 GB model, against its size.

Writes a LLaMA-3.2-1B-shaped base (1.24B parameters, bf16, ~2.5 GB, random weights,
written tensor by tensor so this script itself never holds the model), then runs
``loramkit prune`` and ``loramkit recover --merge`` in child processes and reads their
peak RSS. The floor measured in the same run is a child that imports loramkit,
torch, transformers and peft and does nothing else.

    .venv/bin/python bench/streaming.py [--workdir bench/_work] [--ratio 0.5] [--prune-runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loramkit.bundle.model_dir import plan_shards, shard_names  # noqa: E402
from loramkit.bundle.safetensors_io import StreamingWriter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_rss_of, pyplot  # noqa: E402

LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}  # fmt: skip


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, hd, i = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
        ]  # fmt: skip
    specs.append(("model.norm.weight", (h,)))
    if not c["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (c["vocab_size"], h)))
    return specs


def write_base(d: Path, config: dict, shard_bytes: int = 1 << 30) -> int:
    """A random bf16 checkpoint, sharded like transformers; returns its size in bytes."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    specs = tensor_specs(config)
    shards = plan_shards([(n, 2 * torch.Size(s).numel()) for n, s in specs], shard_bytes)
    files = shard_names(len(shards))
    shape = dict(specs)
    g = torch.Generator().manual_seed(0)
    for f, names in zip(files, shards):
        w = StreamingWriter(d / f, [(n, "BF16", shape[n]) for n in names], {"format": "pt"})
        for n in names:
            w.write(n, (torch.randn(shape[n], generator=g) * 0.02).to(torch.bfloat16))
        w.close()
    if len(files) > 1:
        weight_map = {n: f for f, names in zip(files, shards) for n in names}
        total = sum(2 * torch.Size(s).numel() for s in shape.values())
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--prune-runs", type=int, default=2, help="runs of each prune way (interleaved); the table shows the faster")
    args = ap.parse_args()
    work, py = args.workdir, sys.executable
    env = {"PYTHONPATH": str(ROOT)}
    base = work / "llama-3.2-1b-shape"
    if not (base / "config.json").exists():
        print("writing the base checkpoint ...", flush=True)
        write_base(base, LLAMA_32_1B)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest_tensor = 2 * max(torch.Size(s).numel() for _, s in tensor_specs(LLAMA_32_1B))
    largest_projection = 2 * max(torch.Size(s).numel() for n, s in tensor_specs(LLAMA_32_1B) if "layers." in n)
    largest_shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
    bundle, adapter, recovered = work / "bundle", work / "adapter", work / "recovered"
    floor, _ = peak_rss_of([py, "-c", "import loramkit.prune.pruner, loramkit.recover.merge, transformers, peft"])
    prune_floor, _ = peak_rss_of([py, "-c", "import loramkit.cli, loramkit.prune.pruner"])  # what `loramkit prune` imports
    runs: dict[str, tuple[int, float]] = {}
    repeats: dict[str, list[tuple[int, float]]] = {}
    load = [os.getloadavg()[0]]
    prune_pair = {
        "prune: loramkit (streaming)": (
            [py, "-m", "loramkit", "prune", str(base), "--out", str(bundle), "--ratio", str(args.ratio), "--overwrite"],
            None,
        ),
        "prune: load + prune in memory": (
            [py, str(ROOT / "bench" / "_inmemory_prune.py"), str(base), str(work / "inmemory.safetensors"), str(args.ratio)],
            env,
        ),
    }
    for _ in range(args.prune_runs):  # interleaved, so a busy spell on a shared machine hits both
        for name, (argv, child_env) in prune_pair.items():
            repeats.setdefault(name, []).append(peak_rss_of(argv, child_env))
    for name, measured in repeats.items():  # the table: each way's faster run (all runs are in the JSON)
        runs[name] = min(measured, key=lambda m: m[1])
    # A LoRA adapter (r=8, every projection) of the pruned model, then its recovery.
    subprocess.run([py, str(Path(__file__).with_name("_make_adapter.py")), str(bundle), str(adapter)], check=True)
    runs["recover: loramkit"] = peak_rss_of(
        [py, "-m", "loramkit", "recover", str(adapter), "--out", str(recovered), "--bundle", str(bundle), "--overwrite"]
    )
    runs["recover: safetensors read + write floor"] = peak_rss_of(
        [py, str(ROOT / "bench" / "_safetensors_floor.py"), str(adapter / "adapter_model.safetensors"),
         str(bundle / "kept_indices.safetensors"), str(recovered / "adapter_model.safetensors"), str(work / "floor.safetensors")], env
    )  # fmt: skip
    merge_code = (
        "import sys; from loramkit.bundle import Bundle; from loramkit.recover.merge import merge_adapter; "
        "merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], Bundle(sys.argv[4]), overwrite=True)"
    )
    runs["merge: loramkit (streaming)"] = peak_rss_of(
        [py, "-c", merge_code, str(base), str(recovered), str(work / "merged"), str(bundle)]
    )
    runs["merge: PEFT merge_and_unload (in memory)"] = peak_rss_of(
        [py, str(ROOT / "bench" / "_peft_merge.py"), str(base), str(recovered), str(work / "merged-peft")], env
    )
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
        "model": "LLaMA-3.2-1B shape (1.24B params, bf16, random weights)",
        "model_bytes": size,
        "largest_shard_bytes": largest_shard,
        "largest_tensor_bytes": largest_tensor,
        "largest_projection_bytes": largest_projection,
        "import_floor_rss": floor,
        "prune_import_floor_rss": prune_floor,
        "ratio": args.ratio,
        "runs": {k: {"peak_rss": r, "seconds": t} for k, (r, t) in runs.items()},
        "prune_runs": {k: [{"peak_rss": r, "seconds": t} for r, t in m] for k, m in repeats.items()},
        "load_average": {"start": load[0], "end": os.getloadavg()[0]},  # 1-minute, other users' work included
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    md = [
        f"# Streaming prune, recover and merge ({result['date']}, {result['machine']})",
        "",
        f"Model: {result['model']}, {mib(size)} of safetensors in 3 shards (largest {mib(largest_shard)}); largest "
        f"tensor (embeddings) {mib(largest_tensor)}, largest projection {mib(largest_projection)}. Peak RSS is each "
        f"process's VmHWM; the import floor (loramkit + torch + transformers + peft) is {mib(floor)}.",
        "",
        "| run | peak RSS | above floor | above floor / model size | time | time vs the other way |",
        "|---|---|---|---|---|---|",
    ]
    names = list(runs)
    for i, name in enumerate(names):
        rss, t = runs[name]
        other = runs[names[i + 1 if i % 2 == 0 else i - 1]]
        md.append(f"| {name} | {mib(rss)} | {mib(rss - floor)} | {(rss - floor) / size:.2f} | {t:.1f} s | {t / other[1]:.2f}x |")
    md += [
        "",
        "Prune runs, interleaved (the table shows each way's faster): "
        + "; ".join(f"{k.removeprefix('prune: ')}: {', '.join(f'{t:.1f} s' for _, t in m)}" for k, m in repeats.items())
        + f". `loramkit prune` imports neither transformers nor peft: its own import floor (loramkit + torch) is "
        f"{mib(prune_floor)}, and its peak is {mib(runs['prune: loramkit (streaming)'][0] - prune_floor)} above that"
        + f". 1-minute load average {result['load_average']['start']:.1f} at the start, "
        f"{result['load_average']['end']:.1f} at the end, on {os.cpu_count()} cores (other users' work included).",
    ]
    (out / "streaming.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    chart(result, out / "streaming.png")


def chart(result: dict, path: Path) -> None:
    """Peak memory and time, each loramkit run beside its alternative."""
    plt = pyplot()
    if plt is None:
        return
    names = list(result["runs"])
    floor = result["import_floor_rss"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:blue" if "loramkit" in n else "tab:gray" for n in names]
    ax1.barh(names, [result["runs"][n]["peak_rss"] / 2**20 for n in names], color=colors)
    ax1.set_xlabel("peak RSS (MiB)")
    ax1.axvline(floor / 2**20, color="black", linestyle=":", label="import floor")
    ax1.axvline((floor + result["model_bytes"]) / 2**20, color="tab:red", linestyle="--", label="floor + model size")
    ax1.legend()
    ax1.invert_yaxis()
    ax2.barh(names, [result["runs"][n]["seconds"] for n in names], color=colors)
    ax2.set_xlabel("seconds")
    ax2.set_yticks([])
    ax2.invert_yaxis()
    fig.suptitle(f"{result['model']}: {result['date']}, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
