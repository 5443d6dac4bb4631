"""Keep streaming work's resident memory at what it uses, not what it once used.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which tensor-sized buffers come from the heap and fragment it: streaming a model then
ratchets resident memory up layer by layer. A fixed 1 MiB threshold sends every large
buffer to its own mapping, returned to the system when freed. No-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large or larger get their own mapping


@functools.cache
def return_large_blocks_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (once per process); True when it took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
