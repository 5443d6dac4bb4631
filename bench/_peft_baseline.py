"""Plain PEFT LoRA (or QLoRA with ``nf4``) on a full model, baselines of bench/train_memory.py.

The same data, batches, LoRA config, optimizer, device and precision (``--precision auto``:
bf16 autocast where the hardware has bf16, else fp32) as ``loramkit train``, with nothing of
loramkit's training code: transformers (+ bitsandbytes) + peft + a plain loop.

    python bench/_peft_baseline.py BASE DATA STEPS MICRO_BATCH SEQ_LEN OUT_JSON [nf4]
"""

import json
import sys
import time

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramkit.precision import resolve_precision
from loramkit.train.data import collate, load_examples
from loramkit.train.loop import BatchPlan, pick_device

base, data, steps, mb, seq_len, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
tok = AutoTokenizer.from_pretrained(base)
examples, _ = load_examples(data, tok, seq_len)
device = pick_device(None, 1)  # CUDA when present, as loramkit train
prec = resolve_precision("auto", device)
if sys.argv[7:] == ["nf4"]:  # QLoRA: bitsandbytes NF4, double quantization, compute in the run's dtype
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=prec.compute_dtype)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quant, device_map=device.type, dtype=prec.compute_dtype
    )
    for m in model.modules():  # FIELD-NOTES bug A: no AVX512-BF16 repacking
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
else:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=prec.compute_dtype).to(device)
torch.manual_seed(0)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
plan = BatchPlan(len(examples), mb, 1, 1, 0)
model.train()
tokens, t0 = 0, time.perf_counter()
for step in range(steps):
    batch = {
        k: v.to(device) for k, v in collate([examples[i] for i in plan.micro_batches(step, 0)[0]], tok.pad_token_id or 0).items()
    }
    with torch.autocast(device.type, dtype=prec.autocast_dtype or torch.bfloat16, enabled=prec.autocast_dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens += int(batch["attention_mask"].sum())  # a device sync each step, as loramkit's loss.item()
seconds = time.perf_counter() - t0
json.dump({"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}, open(out, "w"))
