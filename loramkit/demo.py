"""``loramkit demo``: train small, infer large, end to end on a small embedded model.

1. Builds a small Llama-architecture base (GQA, 8 layers) and a BPE tokenizer, and
   pre-trains the base briefly on generated text (cached in the work directory), so
   that it knows the language of the task but not its facts.
2. Prunes it (LoRAM-Stru, magnitude, ratio 0.5) and quantizes the bundle to NF4 (QLoRAM).
3. Trains LoRA on the NF4 bundle with ``loramkit train``, and for comparison LoRA on the
   full model (a ratio-0 bundle: the same trainer, nothing removed), each in its own
   process so that each peak memory is its own.
4. Recovers the QLoRAM adapter onto the base and evaluates held-out task data.

Offline, a few minutes on 2 CPU cores, in the precision the CPU computes fastest
(bf16 autocast with AVX512-BF16 or AMX, fp32 otherwise: see :mod:`loramkit.precision`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# A scaled-down LLaMA-3 shape: GQA with G = 4, explicit head_dim, untied embeddings.
DEMO_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PRETRAIN = {"steps": 150, "batch": 16, "seq_len": 64, "lr": 3e-3, "warmup": 15, "seed": 0}

_ANIMALS = "otter heron badger lynx falcon marten viper bison crane gecko ibis koala lemur newt orca puma raven stoat tapir wombat".split()
_COLOURS = "amber azure crimson ivory jade ochre scarlet silver teal umber violet".split()
_PLACES = "river forest valley meadow harbour desert canyon marsh tundra orchard".split()
_VERBS = "watches follows greets avoids visits guards chases finds".split()
_TIMES = "at dawn|at dusk|in spring|in winter|after the rain|before noon".split("|")


_TASK_ANIMALS = _ANIMALS[:10]


def _facts() -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random(1234)
    return {a: rng.choice(_COLOURS) for a in _TASK_ANIMALS}, {a: rng.choice(_PLACES) for a in _TASK_ANIMALS}


def general_texts(n: int, seed: int) -> list[str]:
    """Pre-training text: the task's language, with random colours and homes (no facts to learn)."""
    rng = random.Random(seed)

    def sentence() -> str:
        a, b = rng.sample(_ANIMALS, 2)
        ca, cb, ha = rng.choice(_COLOURS), rng.choice(_COLOURS), rng.choice(_PLACES)
        return rng.choice(
            [
                f"The {a} is {ca} and lives by the {ha}.",
                f"Every {a} is {ca}. The {a} {rng.choice(_VERBS)} the {b}, which is {cb}.",
                f"By the {ha} you find the {ca} {a} {rng.choice(_TIMES)}.",
                f"Q: What colour is the {a}? A: {ca}. Q: Where does it live? A: by the {ha}.",
                f"The {a} {rng.choice(_VERBS)} the {b} {rng.choice(_TIMES)}.",
            ]
        )

    return [" ".join(sentence() for _ in range(3)) for _ in range(n)]


def task_texts(n: int, seed: int) -> list[str]:
    """The fine-tuning task: ten animals, each with one colour and one home, said in three ways."""
    rng = random.Random(seed)
    colour, home = _facts()

    def sentence() -> str:
        a = rng.choice(_TASK_ANIMALS)
        return rng.choice(
            [
                f"The {a} is {colour[a]} and lives by the {home[a]}.",
                f"Q: What colour is the {a}? A: {colour[a]}. Q: Where does it live? A: by the {home[a]}.",
                f"By the {home[a]} you find the {colour[a]} {a}.",
            ]
        )

    return [" ".join(sentence() for _ in range(3)) for _ in range(n)]


def _tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (bos <s>, eos </s>, pad <pad>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def pretrain(
    model: torch.nn.Module,
    examples: list,
    pad_id: int,
    *,
    steps: int,
    batch: int,
    lr: float,
    warmup: int,
    seed: int,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = None,
    precision: str = "auto",
    log=print,
    label: str = "pre-training the base",
) -> list[float]:
    """Full-parameter pre-training from scratch (AdamW, warmup + cosine); returns the loss per step.

    The step loop and precision rule of ``train`` and ``align`` (:mod:`loramkit.train.loop`,
    :mod:`loramkit.precision`), with every parameter trained and no checkpoints. Shared by the
    demo and ``bench/replicate``; the model stays on its device, batches follow it.
    """
    import tempfile

    from .precision import resolve_precision
    from .train.loop import LoopConfig, run_loop

    device = next(model.parameters()).device
    prec = resolve_precision(precision, device)
    log(f"{label}: precision {prec.describe()}")
    cfg = LoopConfig(
        total_steps=steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup, micro_batch=batch, seed=seed,
        autocast_dtype=prec.autocast_dtype, max_grad_norm=max_grad_norm, log_every=50, label=label,
    )  # fmt: skip
    trainable = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as never_written:  # save_every=0: no checkpoint is made
        r = run_loop(model, trainable, examples, [], pad_id, cfg, device=device, rank=0, world=1,
                     ckpt_root=Path(never_written), identity={}, log=log)  # fmt: skip
    return r.history


def build_base(workdir: Path, log=print, precision: str = "auto") -> Path:
    """The pre-trained demo base, built once per work directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .precision import resolve_precision
    from .train.data import load_examples

    base_dir = workdir / "base"
    resolved = resolve_precision(precision, torch.device("cpu")).name  # a base pre-trained otherwise is rebuilt
    stamp = json.dumps({"config": DEMO_CONFIG, "pretrain": PRETRAIN, "precision": resolved})
    if (base_dir / "demo.json").is_file() and (base_dir / "demo.json").read_text() == stamp:
        log(f"base model: {base_dir} (cached)")
        return base_dir
    t0 = time.perf_counter()
    tok = _tokenizer(general_texts(2000, seed=10) + task_texts(200, seed=11))
    corpus = workdir / "data" / "pretrain.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n\n".join(general_texts(6000, seed=12)))
    torch.manual_seed(PRETRAIN["seed"])
    model = AutoModelForCausalLM.from_config(LlamaConfig(**DEMO_CONFIG, vocab_size=len(tok)))
    examples, _ = load_examples(corpus, tok, PRETRAIN["seq_len"])
    pretrain(model, examples, tok.pad_token_id, steps=PRETRAIN["steps"], batch=PRETRAIN["batch"], lr=PRETRAIN["lr"],
             warmup=PRETRAIN["warmup"], seed=PRETRAIN["seed"], precision=precision, log=log)  # fmt: skip
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    (base_dir / "demo.json").write_text(stamp)
    log(f"base model: {base_dir} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"pre-trained in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return base_dir


def _train_in_child(bundle: Path, data: Path, out: Path, steps: int, precision: str, log) -> dict[str, Any]:
    """``loramkit train`` in its own process, so its peak memory is its own."""
    cmd = [sys.executable, "-m", "loramkit", "train", str(bundle), "--data", str(data), "--out", str(out),
           "--max-steps", str(steps), "--seq-len", "64", "--micro-batch", "8", "--lr", "3e-3", "--rank", "8",
           "--alpha", "16", "--warmup-steps", "10", "--precision", precision, "--overwrite"]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "LORAMKIT_NO_PROGRESS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training on {bundle} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "loram_adapter.json").read_text())["training"]["summary"]
    log(f"trained on {bundle.name}: {summary['steps']} steps, {summary['tokens_per_second']:,.0f} tokens/s, "
        f"peak {summary['peak_memory_bytes'] / 2**20:,.0f} MiB, {summary['precision']}")  # fmt: skip
    return summary


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.name != "kept_indices.safetensors")


def run(workdir: Path, *, ratio: float = 0.5, steps: int = 120, precision: str = "auto", log=print) -> dict[str, Any]:
    """Run the demo in ``workdir``; returns the rows of the result table.

    ``precision`` (see :mod:`loramkit.precision`) applies to pre-training, both LoRA runs and
    the evaluation: ``auto`` is bf16 autocast on CPUs that compute bf16 natively, else fp32.
    """
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model.loader import load_pruned_model
    from .precision import resolve_precision
    from .prune.pruner import prune
    from .quant import quantize_bundle
    from .recover.adapter import recover_adapter
    from .train.data import load_examples
    from .train.metrics import evaluate

    t0 = time.perf_counter()
    prec = resolve_precision(precision, torch.device("cpu"))
    log(f"precision: {prec.describe()}")
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir = build_base(workdir, log, precision)
    data = workdir / "data"
    (data / "task-train.txt").write_text("\n\n".join(task_texts(600, seed=1)))
    (data / "task-heldout.txt").write_text("\n\n".join(task_texts(80, seed=2)))

    pruned, qloram, full = workdir / "bundle-pruned", workdir / "bundle-nf4", workdir / "bundle-full"
    prune(base_dir, pruned, ratio, importance="magnitude", overwrite=True, show_progress=False)
    quantize_bundle(pruned, qloram, quant_type="nf4", double_quant=True, overwrite=True)
    prune(base_dir, full, 0.0, overwrite=True, show_progress=False)  # nothing removed: plain LoRA
    log(f"pruned at ratio {ratio} and quantized to NF4: {qloram}")

    qloram_run = _train_in_child(qloram, data / "task-train.txt", workdir / "adapter-qloram", steps, prec.name, log)
    full_run = _train_in_child(full, data / "task-train.txt", workdir / "adapter-lora-full", steps, prec.name, log)
    recover_adapter(workdir / "adapter-qloram", workdir / "adapter-recovered", overwrite=True)
    recover_adapter(workdir / "adapter-lora-full", workdir / "adapter-lora-full-base", overwrite=True)

    tok = AutoTokenizer.from_pretrained(base_dir)
    held_out, _ = load_examples(data / "task-heldout.txt", tok, 64)

    def ppl(model) -> float:
        return evaluate(model, held_out, tok.pad_token_id, 16, prec.autocast_dtype)["perplexity"]

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    adapter_bytes = _weight_bytes(workdir / "adapter-recovered")
    rows = [
        ("base (untuned)", ppl(base()), _weight_bytes(base_dir), None),
        ("base + recovered QLoRAM", ppl(peft.PeftModel.from_pretrained(base(), workdir / "adapter-recovered")),
         _weight_bytes(base_dir) + adapter_bytes, qloram_run),
        ("pruned NF4 + adapter",
         ppl(peft.PeftModel.from_pretrained(load_pruned_model(qloram, compute_dtype=prec.compute_dtype),
                                            workdir / "adapter-qloram")),
         _weight_bytes(qloram) + _weight_bytes(workdir / "adapter-qloram"), qloram_run),
        ("base + full-model LoRA", ppl(peft.PeftModel.from_pretrained(base(), workdir / "adapter-lora-full-base")),
         _weight_bytes(base_dir) + adapter_bytes, full_run),
    ]  # fmt: skip
    return {
        "rows": [
            {
                "model": name,
                "perplexity": p,
                "parameter_bytes": b,
                "train_peak_bytes": r["peak_memory_bytes"] if r else None,
                "train_tokens_per_second": r["tokens_per_second"] if r else None,
            }
            for name, p, b, r in rows
        ],  # fmt: skip
        "seconds": time.perf_counter() - t0,
        "workdir": str(workdir),
        "precision": prec.to_json(),
    }
