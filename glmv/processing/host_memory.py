"""Host memory for CPU inference: keep freed blocks for the next step instead of returning them.

A CPU step allocates and frees the same large activations every time (patch rows, attention
scores, MLP outputs of a batch). glibc's malloc serves a block above its mmap threshold with a
fresh `mmap` and gives it back on free, and trims free memory at the top of the heap above its
trim threshold: each step then pays page faults and zeroing of the same megabytes again.
Raising both thresholds keeps those pages in the heap for the next step. Measured on the 2-core
machine (`benchmarks/RESULTS.md`, "Host memory"): 16 image requests × 64 tokens on the tiny
checkpoint, offline, about 1.2 × the output tok/s, and the first batch of a new engine as fast as
the later ones. The cost is that the core's resident memory stays at its peak.

Raising only the trim threshold is worse than the default (it turns off the dynamic mmap threshold
and every large block is mapped afresh), so it is raised only once the mmap threshold was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and the values set: blocks up to 1 GiB come from the heap, and up to
# 1 GiB of free memory at its top stays mapped.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
RETAIN_BYTES = 1 << 30

_retained: bool | None = None


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where the C library has
    no `mallopt` (musl, macOS) or refuses the values."""
    global _retained
    if _retained is not None:
        return _retained
    _retained = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: the trim threshold alone would be worse than the default.
    if mallopt(_M_MMAP_THRESHOLD, RETAIN_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES) == 1:
        _retained = True
        logger.debug("host memory: malloc keeps freed blocks up to %d bytes", RETAIN_BYTES)
    return _retained
