"""CPU tuning for a training process: the cores it may use, how many threads BLAS runs,
and glibc's allocator.

Both change the whole process, so the library never does either on import:
tinyattn.parallel holds BLAS to each shard's share of the step's cores, and applications
(train.py, the benchmarks) call `tune_allocator()`.
"""
import contextlib
import ctypes
import ctypes.util
import os
import sys

import threadpoolctl


def core_count():
    """The cores this process may run on (its CPU affinity where the OS tells, as taskset and
    containers set it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


# --- BLAS threads -------------------------------------------------------------------------------
# threadpoolctl finds the BLAS libraries loaded in the process (OpenBLAS, MKL, BLIS,
# FlexiBLAS; on Linux, macOS and Windows) and calls their own thread-count functions.
# docs/performance.md says why it is worth a run-time dependency.

_blas = None  # a threadpoolctl controller of the BLAS libraries loaded, made at first use (after NumPy's BLAS is loaded)


def _blas_libraries():
    global _blas
    if _blas is None:
        _blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    return _blas


def can_limit_blas_threads():
    """Whether blas_threads() can change how many threads NumPy's matrix products use."""
    return bool(_blas_libraries().lib_controllers)


def blas_thread_count():
    """How many threads NumPy's BLAS may use now, or None where no BLAS is known."""
    counts = [library.num_threads for library in _blas_libraries().lib_controllers]
    return max(counts) if counts else None


def blas_kernels():
    """The kernels NumPy's OpenBLAS chose for this CPU (such as 'Haswell' or 'SkylakeX'),
    or None for another BLAS: float32 products round by them."""
    return next((library.architecture for library in _blas_libraries().lib_controllers
                 if library.internal_api == "openblas"), None)


@contextlib.contextmanager
def blas_threads(count):
    """Run the block with NumPy's BLAS using at most `count` threads, then restore the
    previous count. Process-wide; does nothing where can_limit_blas_threads() is False."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"BLAS threads must be a positive integer, got {count!r}")
    with _blas_libraries().limit(limits=count):
        yield


# --- the allocator -------------------------------------------------------------------------------
# Keep glibc from returning medium-sized arrays' memory to the OS after every free.
#
# glibc serves allocations above its mmap threshold (128 KiB at first, adjusted as the
# program runs) with fresh pages from the kernel and unmaps them on free, so every new
# temporary array of about 128 KiB to 1 MiB pays for page faults on first touch. A
# training step makes hundreds of those. Raising the mmap threshold, and the trim
# threshold with it, lets freed blocks be reused instead; on this project's machine that
# took the step of an early, unfused engine from 38 to 30 ms (docs/performance.md).
#
# Applications (train.py, the benchmarks) call `tune_allocator()`;
# TINYATTN_NO_MALLOC_TUNING=1 switches it off.

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
