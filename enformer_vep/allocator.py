"""Host memory allocation for large activations on CPU (glibc).

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and returns it to
the system when freed, so each forward pass faults its activations (hundreds of MB) in again,
page by page: with a 384-channel model half of a CPU scoring run was kernel time. Keeping freed
memory in the process (no mmap for large blocks, no trimming) removes those faults; memory stays
bounded by the largest working set, which is reused from then on.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("enformer_vep")

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP = 2**31 - 1  # the largest trim threshold mallopt takes: freed memory stays in the process


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse instead of returning it to the system. Returns
    whether it was applied: not on other C libraries, nor with ``ENFORMER_VEP_MALLOC=system``."""
    if os.environ.get("ENFORMER_VEP_MALLOC", "").lower() == "system":
        return False
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
    if not applied:
        log.debug("glibc mallopt refused the allocator settings")
    return applied
