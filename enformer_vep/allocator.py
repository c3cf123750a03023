"""Host memory allocation for large activations on CPU (glibc).

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and returns it to
the system when freed, so each forward pass faults its activations (hundreds of MB) in again,
page by page: with a 384-channel model half of a CPU scoring run was kernel time. Keeping freed
memory in the process (no mmap for large blocks, no trimming) removes those faults; memory stays
bounded by the largest working set, which is reused from then on.

oneDNN, which runs PyTorch's CPU convolutions, caches a compiled primitive per input shape (1,024 by
default), each holding buffers the size of its activations. The scorer convolves patches of many
widths (an allele's changed bins, tile chunks, window ends), so with the default cache a long CPU
run grew by megabytes per new shape until it was killed (22 GB after an hour with a 384-channel
model). A small cache keeps memory bounded; a full pass reuses its few shapes, so little is rebuilt.

Kept memory can still fragment: long-lived tensors (tiles, cached primitives) split freed regions, so
a later large activation takes fresh memory while the split pieces stay resident. ``FreedMemoryGuard``
watches the resident size between groups and hands freed pages back (``malloc_trim``) once it has
doubled since the first group (a limit that rises when trims come too often, i.e. when the working
set itself is larger), so memory stays within a small multiple of the working set and the page
faults of one refill are paid only per working set of growth.
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

ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
PRIMITIVE_CACHE_CAPACITY = 64  # a full pass needs ~15 shapes per batch size; 32-64 kept a 400-shape run at 0.5 GB


def configure_cpu_memory() -> None:
    """Apply both CPU memory settings of this module, as ``enformer-score`` does at start-up: call it
    before the first convolution (oneDNN reads its cache capacity once)."""
    keep_freed_memory()
    bound_primitive_cache()


def bound_primitive_cache() -> int:
    """Cap oneDNN's primitive cache at ``PRIMITIVE_CACHE_CAPACITY`` entries unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; returns the capacity in force. Effective only before
    oneDNN creates its first primitive in this process."""
    return int(os.environ.setdefault(ONEDNN_CACHE, str(PRIMITIVE_CACHE_CAPACITY)))


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


class FreedMemoryGuard:
    """Bounds the resident memory kept by :func:`keep_freed_memory` (see the module docstring).

    Call :meth:`check` between groups of work (after the tensors of a group are freed). The first call
    sets the limit to twice the resident size then; a later call above the limit returns glibc's free
    pages to the system with ``malloc_trim(0)``. The first group can be lighter than later ones (a
    tiled block's first group, a block whose first indel comes later), so when two trims come within
    ``RETRIM_GROUPS`` checks the limit was below the working set itself and rises by half; it also
    stays at least twice what is left after a trim. No-op without glibc.
    """

    RETRIM_GROUPS = 16

    def __init__(self):
        try:
            self._trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
            self._trim.argtypes, self._trim.restype = (ctypes.c_size_t,), ctypes.c_int
        except (OSError, AttributeError, TypeError):
            self._trim = None
        self.limit_mib: float | None = None
        self.trims = 0
        self._checks_since_trim: int | None = None  # None before the first trim

    def check(self) -> None:
        """Trim if the resident size exceeds the limit (MiB); the first call sets the limit."""
        if self._trim is None:
            return
        rss = resident_mib()
        if self.limit_mib is None:
            self.limit_mib = 2 * rss
            return
        if self._checks_since_trim is not None:
            self._checks_since_trim += 1
        if rss <= self.limit_mib:
            return
        self._trim(0)
        self.trims += 1
        left = resident_mib()
        if self._checks_since_trim is not None and self._checks_since_trim < self.RETRIM_GROUPS:
            self.limit_mib *= 1.5
        self.limit_mib = max(self.limit_mib, 2 * left)
        self._checks_since_trim = 0
        log.debug("returned %.0f MiB of freed memory to the system (%.0f MiB resident, limit now %.0f MiB)",
                  rss - left, left, self.limit_mib)


def resident_mib() -> float:
    """This process's resident set size in MiB (``/proc/self/statm``; 0 where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0
