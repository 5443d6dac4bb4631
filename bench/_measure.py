"""Peak memory of a child process, measured by the child itself (VmHWM at exit).

getrusage's ru_maxrss would be wrong here: Linux carries it across exec from the forking
parent, so a child forked from a large parent reports the parent's peak. VmHWM belongs
to the new address space alone.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

_REPORT = """
import atexit, runpy, sys
out, mode, target = sys.argv[1:4]
def _report():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(out, 'w').write(str(int(line.split()[1]) * 1024))
atexit.register(_report)
sys.argv = [target] + sys.argv[4:]
if mode == '-m':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
elif mode == '-c':
    exec(target)
else:
    runpy.run_path(target, run_name='__main__')
"""


def peak_rss_of(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of ``python -m MODULE ...``, ``python -c CODE`` or ``python SCRIPT ...``."""
    peak, seconds, _ = run_measured(argv, env, capture=False)
    return peak, seconds


def run_measured(argv: list[str], env: dict[str, str] | None = None, *, capture: bool = True) -> tuple[int, float, str]:
    """:func:`peak_rss_of`, also returning the child's stdout when ``capture`` (stderr passes through)."""
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
    return int(report.read_text()), time.perf_counter() - t0, proc.stdout or ""


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
