"""The floor for recover in bench/streaming.py: read the adapter and the index maps, write the
recovered adapter's bytes, with safetensors and nothing else.

    python bench/_safetensors_floor.py ADAPTER_FILE MAPS_FILE RECOVERED_FILE OUT_FILE
"""

import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

adapter, maps, recovered, out = sys.argv[1:5]
load_file(adapter)
load_file(maps)
with safe_open(recovered, "pt") as f:  # shapes only: the write below is the same bytes, zeros
    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
save_file({k: torch.zeros(s) for k, s in shapes.items()}, out)
