"""PEFT + the HF Trainer on the SAME pruned model as `loramkit train` (a LoRAM bundle): what
loramkit's own training loop costs on top. Same data, LoRA config, optimizer and precision.

    python bench/_hf_trainer_baseline.py BUNDLE DATA STEPS MICRO_BATCH SEQ_LEN OUT_JSON
"""

import json
import sys
import time

import peft
import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from loramkit import load_pruned_model
from loramkit.precision import resolve_precision
from loramkit.train.data import collate, load_examples
from loramkit.train.loop import pick_device

bundle, data, steps, mb, seq_len, out = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
    sys.argv[6],
)
tok = AutoTokenizer.from_pretrained(bundle)
examples, _ = load_examples(data, tok, seq_len)
device = pick_device(None, 1)  # CUDA when present, as loramkit train; the same precision rule
prec = resolve_precision("auto", device)
model = load_pruned_model(bundle, dtype=prec.compute_dtype, compute_dtype=prec.compute_dtype, device=device)
torch.manual_seed(0)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip


class Timer(TrainerCallback):
    """Time the optimizer steps only, as loramkit's summary does (no model loading, no setup)."""

    def on_train_begin(self, *a, **k):
        self.t0 = time.perf_counter()

    def on_train_end(self, *a, **k):
        self.seconds = time.perf_counter() - self.t0


rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
timer = Timer()
args = TrainingArguments(output_dir=out + ".tmp", max_steps=steps, per_device_train_batch_size=mb, learning_rate=2e-4,
                         lr_scheduler_type="cosine", bf16=prec.name == "bf16-mixed",
                         fp16=prec.name == "fp16-mixed", use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
                         logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False)  # fmt: skip
trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer],
                  data_collator=lambda b: collate([type(examples[0])(r["input_ids"], r["labels"]) for r in b], tok.pad_token_id or 0))  # fmt: skip
trainer.train()
tokens = steps * mb * seq_len
json.dump(
    {"steps": steps, "tokens": tokens, "seconds": timer.seconds, "tokens_per_second": tokens / timer.seconds}, open(out, "w")
)
