"""CPU tuning for a training process: how many threads BLAS runs, and glibc's allocator.

Both change the whole process, so the library never does either on import:
tinyattn.parallel holds BLAS to its share of the cores while a batch's shards run side
by side, and applications (train.py, the benchmarks) call `tune_allocator()`.
"""
import contextlib
import ctypes
import ctypes.util
import os
import sys

# --- BLAS threads -------------------------------------------------------------------------------

_openblas_threads = None  # (set, get) functions of the OpenBLAS NumPy loaded, once found; False if none


def _find_openblas_threads():
    """The set/get thread-count functions of the OpenBLAS in this process (NumPy's wheels
    bundle one, with prefixed symbols), found through the loaded libraries; None elsewhere
    (another BLAS, or no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_{}_num_threads64_", "scipy_openblas_{}_num_threads", "openblas_{}_num_threads64_", "openblas_{}_num_threads"):
            setter, getter = (getattr(library, name.format(verb), None) for verb in ("set", "get"))
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


def _blas_thread_control():
    global _openblas_threads
    if _openblas_threads is None:
        _openblas_threads = _find_openblas_threads() or False
    return _openblas_threads or None


def can_limit_blas_threads():
    """Whether blas_threads() can change how many threads NumPy's matrix products use."""
    return _blas_thread_control() is not None


def blas_thread_count():
    """How many threads NumPy's BLAS may use now, or None where that cannot be read."""
    control = _blas_thread_control()
    return None if control is None else control[1]()


@contextlib.contextmanager
def blas_threads(count):
    """Run the block with NumPy's BLAS using at most `count` threads, then restore the
    previous count. Process-wide; does nothing where can_limit_blas_threads() is False."""
    control = _blas_thread_control()
    if control is None:
        yield
        return
    set_threads, get_threads = control
    before = get_threads()
    set_threads(count)
    try:
        yield
    finally:
        set_threads(before)


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
