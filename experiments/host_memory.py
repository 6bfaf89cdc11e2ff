"""Keep freed host memory in the process instead of handing it back to the OS after every step (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so each training step page-faults its activations in again. Measured with
``getrusage`` on a 2-core CPU (docs/results/speed_cpu.md): a Mean Teacher VNet step at 64x64x48, batch 4, took
about 450 000 minor faults (1.8 GB zeroed) per step, and turning the mmap path and heap trimming off made the
same step 1.26x faster for the framework and for a plain loop alike. The cost: RSS stays at the peak of the
largest step, as with PyTorch's CUDA caching allocator, plus some fragmentation (peak RSS +10-15 % there).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameter numbers from glibc's malloc.h
OPT_OUT = "LEMIS_MALLOC"  # =system keeps glibc's defaults


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap path and heap trimming for this process and the workers it forks.

    Skipped (returns False) when ``LEMIS_MALLOC=system``, when the user tunes glibc's malloc already (a
    ``MALLOC_*`` variable or ``glibc.malloc`` in ``GLIBC_TUNABLES``), or when the C library is not glibc.
    """
    user_tuned = (any(k.startswith("MALLOC_") for k in os.environ)
                  or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))
    if os.environ.get(OPT_OUT) == "system" or user_tuned:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt takes an int; glibc converts -1 to SIZE_MAX for the trim threshold, i.e. "never trim".
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_bytes() -> int | None:
    """Bytes glibc holds in mmapped chunks now (``mallinfo2().hblkhd``); None where there is no mallinfo2
    (not glibc, or glibc < 2.33)."""
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().hblkhd)
