"""Baseline for bench/streaming.py: PEFT's merge_and_unload on a fully loaded base, then save_pretrained.

python bench/_peft_merge.py BASE ADAPTER OUT
"""

import sys

import peft
import torch
from transformers import AutoModelForCausalLM

base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
