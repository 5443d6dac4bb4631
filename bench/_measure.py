"""Peak memory of a child process, measured by the child itself at exit: VmHWM (peak RSS)
and, when the child used a GPU, ``torch.cuda.max_memory_allocated``.

getrusage's ru_maxrss would be wrong here: Linux carries it across exec from the forking
parent, so a child forked from a large parent reports the parent's peak. VmHWM belongs
to the new address space alone. On a GPU machine the same benchmarks run on the GPU
(loramkit picks CUDA when present) and report its peak beside the host's, without edits.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

_REPORT = """
import atexit, runpy, sys
out, mode, target = sys.argv[1:4]
def _report():
    import json
    rss = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    torch = sys.modules.get('torch')
    cuda = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
    open(out, 'w').write(json.dumps({'rss': rss, 'cuda': cuda}))
atexit.register(_report)
sys.argv = [target] + sys.argv[4:]
if mode == '-m':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
elif mode == '-c':
    exec(target)
else:
    runpy.run_path(target, run_name='__main__')
"""


@dataclass(frozen=True)
class Measurement:
    rss: int  # peak RSS of the child, bytes
    cuda: int | None  # torch.cuda.max_memory_allocated, when the child used a GPU
    seconds: float
    stdout: str


def peak_rss_of(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of ``python -m MODULE ...``, ``python -c CODE`` or ``python SCRIPT ...``."""
    m = measure(argv, env)
    return m.rss, m.seconds


def run_measured(argv: list[str], env: dict[str, str] | None = None, *, capture: bool = True) -> tuple[int, float, str]:
    """:func:`peak_rss_of`, also returning the child's stdout when ``capture`` (stderr passes through)."""
    m = measure(argv, env, capture=capture)
    return m.rss, m.seconds, m.stdout


def measure(argv: list[str], env: dict[str, str] | None = None, *, capture: bool = False) -> Measurement:
    """Run ``python -m MODULE ...``, ``python -c CODE`` or ``python SCRIPT ...``; its peaks and wall time."""
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"loramkit-hwm-{os.getpid()}"
    py, *rest = argv
    if rest[0] not in ("-m", "-c"):
        rest = ["--script", *rest]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [py, "-c", _REPORT, str(report), *rest],
        check=False,
        env={**os.environ, "LORAMKIT_NO_PROGRESS": "1", **(env or {})},
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    seconds = time.perf_counter() - t0
    peaks = json.loads(report.read_text())
    report.unlink()
    return Measurement(peaks["rss"], peaks["cuda"], seconds, proc.stdout or "")


def machine() -> str:
    """The machine a result was measured on: CPU count and torch, plus the GPU when there is one."""
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def pyplot():
    """matplotlib's pyplot on a file backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")
        return None
    return plt
