"""Keep glibc from returning medium-sized arrays' memory to the OS after every free.

glibc serves allocations above its mmap threshold (128 KiB at first, adjusted as the
program runs) with fresh pages from the kernel and unmaps them on free, so every new
temporary array of about 128 KiB to 1 MiB pays for page faults on first touch. A
training step makes hundreds of those. Raising the mmap threshold, and the trim
threshold with it, lets freed blocks be reused instead; on this project's machine that
took a naive engine's step from 38 to 30 ms (../shared/PERF-NOTES.md).

This changes the whole process, so the library never does it on import: applications
(train.py, the benchmarks) call `tune_allocator()`, and TINYATTN_NO_MALLOC_TUNING=1
switches it off.
"""
import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 512 << 20


def tune_allocator():
    """Raise glibc's mmap and trim thresholds; returns True when applied (Linux with glibc)."""
    if os.environ.get("TINYATTN_NO_MALLOC_TUNING") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
