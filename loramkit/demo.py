"""``loramkit demo``: the train-small-infer-large path end to end on a small embedded model.

Builds a small Llama-architecture base (random weights, a BPE tokenizer trained on
generated text), prunes it, trains a LoRA adapter on the pruned model with plain PEFT,
recovers the adapter onto the base, merges it, and compares held-out loss. Offline,
a couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

# A scaled-down LLaMA-3 shape: GQA with G = 4, explicit head_dim, untied embeddings.
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
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

_ANIMALS = "otter heron badger lynx falcon marten viper bison crane gecko ibis koala lemur newt orca puma raven stoat tapir wombat".split()
_COLOURS = "amber azure crimson ivory jade ochre scarlet silver teal umber violet".split()
_PLACES = "river forest valley meadow harbour desert canyon marsh tundra orchard".split()
_VERBS = "watches follows greets avoids visits guards chases finds".split()


def task_texts(n: int, seed: int) -> list[str]:
    """A small fact-learning task: every animal has one colour and one home, said in several ways."""
    rng = random.Random(1234)  # the facts are fixed; only the sampling of sentences varies
    colour = {a: rng.choice(_COLOURS) for a in _ANIMALS}
    home = {a: rng.choice(_PLACES) for a in _ANIMALS}
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(_ANIMALS, 2)
        out.append(
            rng.choice(
                [
                    f"The {a} is {colour[a]} and lives by the {home[a]}.",
                    f"Every {a} is {colour[a]}. The {a} {rng.choice(_VERBS)} the {b}, which is {colour[b]}.",
                    f"By the {home[a]} you find the {colour[a]} {a}.",
                    f"Q: What colour is the {a}? A: {colour[a]}. Q: Where does it live? A: by the {home[a]}.",
                ]
            )
        )
    return out


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _batches(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """Pack texts into (n, seq_len) blocks of token ids."""
    ids: list[int] = []
    for t in texts:
        ids += [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # (n, seq_len)


@torch.no_grad()
def _loss(model, blocks: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    return sum(losses) / len(losses)


def _bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def run(workdir: Path, *, ratio: float = 0.5, steps: int = 150, seed: int = 0, log=print) -> dict[str, Any]:
    """Run the demo in ``workdir``; returns the rows of the result table."""
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .bundle import Bundle
    from .model.loader import load_pruned_model
    from .prune.pruner import prune
    from .recover.adapter import recover_adapter
    from .recover.merge import merge_adapter

    torch.manual_seed(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, held_out = task_texts(1200, seed=1), task_texts(120, seed=2)
    tok = _tokenizer(task_texts(2000, seed=0))
    base_dir = workdir / "base"
    if not (base_dir / "config.json").exists():
        config = LlamaConfig(**{k: v for k, v in DEMO_CONFIG.items() if k != "architectures"}, vocab_size=len(tok))
        AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
    log(f"base model: {base_dir}")

    bundle_dir = workdir / "bundle"
    prune(base_dir, bundle_dir, ratio, importance="magnitude", overwrite=True, show_progress=False)
    log(f"pruned at ratio {ratio}: {bundle_dir}")

    model = load_pruned_model(bundle_dir, dtype="float32")
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    blocks, eval_blocks = _batches(tok, train, 64), _batches(tok, held_out, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,), generator=g)]  # (8, 64)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"train step {step + 1}/{steps}: loss {loss.item():.3f}")
    adapter_dir = workdir / "adapter"
    model.save_pretrained(adapter_dir)
    pruned_loss = _loss(model, eval_blocks)

    recovered_dir = workdir / "recovered"
    recover_adapter(adapter_dir, recovered_dir, bundle_dir, overwrite=True)
    merged_dir = workdir / "merged"
    merge_adapter(base_dir, recovered_dir, merged_dir, Bundle(bundle_dir), overwrite=True, show_progress=False)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_loss = _loss(base, eval_blocks)
    with_adapter = peft.PeftModel.from_pretrained(base, recovered_dir)
    recovered_loss = _loss(with_adapter, eval_blocks)
    merged_loss = _loss(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), eval_blocks)
    rows = [
        ("base (untuned)", base_loss, _bytes(base_dir)),
        ("pruned + LoRA (no recovery)", pruned_loss, _bytes(bundle_dir)),
        ("base + recovered LoRA", recovered_loss, _bytes(base_dir) + _bytes(recovered_dir)),
        ("base with LoRA merged", merged_loss, _bytes(merged_dir)),
    ]
    return {
        "rows": [{"model": m, "loss": l, "perplexity": math.exp(l), "bytes": b} for m, l, b in rows],
        "seconds": time.perf_counter() - t0,
        "workdir": str(workdir),
    }
