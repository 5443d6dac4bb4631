"""Which progress bars the CLI shows: ours and huggingface_hub's transfers on a terminal, never
transformers' per-load "Loading weights" bar; nothing at all when output is not a terminal.

Each case runs in a fresh interpreter: the switches are process-wide and read at import.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys
{before}
from loramkit import progress
progress.configure_library_bars()
from transformers.utils.logging import tqdm as transformers_tqdm
from huggingface_hub.utils import tqdm as hub_tqdm
with open("/dev/null", "w") as sink:
    loading = transformers_tqdm(range(2), desc="Loading weights", file=sink)
    download = hub_tqdm(range(2), desc="Downloading", file=sink)
    loading_off = type(loading).__name__ == "EmptyTqdm" or loading.disable  # globally off: a stand-in
    print("bars", progress.enabled(), loading_off, download.disable)
"""


def _bars(terminal: bool, before: str = "") -> tuple[bool, bool, bool]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "LORAMKIT_NO_PROGRESS", "TTY_COMPATIBLE")
    }
    if terminal:
        env["TTY_COMPATIBLE"] = "1"  # rich's switch: stderr counts as a terminal
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("bars "))
    shown, loading_off, download_off = (word == "True" for word in line.split()[1:])
    return shown, loading_off, download_off


@pytest.mark.parametrize("before", ["", "import transformers.utils.logging"], ids=["transformers-later", "transformers-first"])
def test_on_a_terminal_transfers_show_and_weight_loading_does_not(before):
    assert _bars(terminal=True, before=before) == (True, True, False)


def test_off_a_terminal_no_library_bar_shows():
    assert _bars(terminal=False) == (False, True, True)
