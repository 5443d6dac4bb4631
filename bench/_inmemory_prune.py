"""Baseline for bench/streaming.py: load the whole model with transformers, prune in memory, save.

The same magnitude scores and slicing as ``loramkit prune`` (loramkit's geometry), on tensors
of a fully loaded model: what a script without streaming does.

    python bench/_inmemory_prune.py BASE OUT RATIO
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from loramkit.families import ArchSpec
from loramkit.families.geometry import layer_index_maps, slice_tensor
from loramkit.families.pruning_rules import plan_layers
from loramkit.prune.importance import group_scores, top_units

base, out, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
state = model.state_dict()
arch = ArchSpec.from_config(model.config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
layers, _ = plan_layers(arch, ratio)
pruned = {}
for d in layers:
    if not d.pruned:
        continue
    kv, ch = group_scores(arch, d.index, state.get, lambda w: w.float().square())  # squared block by block, as prune does
    maps = layer_index_maps(
        arch, d.index, top_units(kv.sqrt(), d.kv_heads[1]), top_units(ch.sqrt(), d.intermediate[1]), set(state)
    )
    for key in {k.rsplit(":", 1)[0] for k in maps}:
        pruned[key] = slice_tensor(state[key], key, maps)
state = {k: pruned.get(k, v).contiguous() for k, v in state.items() if k != "lm_head.weight" or not arch.tie_word_embeddings}
save_file(state, out, metadata={"format": "pt"})
