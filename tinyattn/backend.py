"""The one module that imports NumPy or CuPy to compute on tensor data.

Everything else asks an array for its module (`array_module(array)`) and calls that,
so one code path serves both devices. CuPy is imported only when a CUDA tensor is
first asked for, so `import tinyattn` never touches a GPU. The test suite may put a
stand-in for CuPy in its place (`_use_cuda_module`) to run the CUDA path without a GPU.
"""
import math
import mmap
import os
import time

import numpy

float16 = numpy.dtype("float16")
float32 = numpy.dtype("float32")
float64 = numpy.dtype("float64")
int64 = numpy.dtype("int64")
uint64 = numpy.dtype("uint64")
bool_ = numpy.dtype("bool")

DEVICES = ("cpu", "cuda")
CUDA_INSTALL_HINT = ("install the GPU extra in the tinyattn checkout with: pip install '.[cuda12]', "
                     "or pip install '.[cuda13]' where nvidia-smi shows CUDA Version 13.0 or newer (docs/backends.md)")
NO_GPU_HINT = ("check the NVIDIA driver with nvidia-smi: the CUDA Version it shows must be at least the CuPy "
               "wheel's (12 for cupy-cuda12x, 13 for cupy-cuda13x); or use the cpu device")

_cupy = None  # the CuPy module once loaded, and its companion package cupyx
_cupyx = None
_default_device = None


class DeviceError(RuntimeError):
    """A device that cannot be used here, or tensors on different devices in one op."""


class HookHandle:
    """What the add_*_hook functions return: remove() detaches the hook, as with PyTorch's hook handles."""

    def __init__(self, hooks, hook):
        self.hooks, self.hook = hooks, hook
        hooks.append(hook)

    def remove(self):
        if self.hook in self.hooks:
            self.hooks.remove(self.hook)


def _load_cupy():
    global _cupy, _cupyx
    if _cupy is None:
        try:
            import cupy
        except ImportError as error:
            raise DeviceError(f"device 'cuda' needs CuPy, which is not installed ({error}); {CUDA_INSTALL_HINT}") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # CuPy raises its own runtime error types when no driver is present
            raise DeviceError(f"device 'cuda' is not usable: CuPy is installed but found no working GPU ({error}); {NO_GPU_HINT}") from None
        if count == 0:
            raise DeviceError(f"device 'cuda' is not usable: CuPy is installed but found no GPU; {NO_GPU_HINT}")
        import cupyx
        _cupy, _cupyx = cupy, cupyx
    return _cupy


def _use_cuda_module(cupy_like, cupyx_like):
    """For tests only: compute 'cuda' tensors with `cupy_like` and `cupyx_like` in place of
    CuPy and cupyx (tests/cupy_standin.py runs the CUDA path on a machine without a GPU).
    `_use_cuda_module(None, None)` returns to CuPy not loaded."""
    global _cupy, _cupyx, _default_device
    _cupy, _cupyx = cupy_like, cupyx_like
    if _default_device == "cuda":
        _default_device = None  # it named the module just replaced


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    try:
        _load_cupy()
    except DeviceError:
        return False
    return True


def check_device(device):
    """Return a valid device name, or raise one clear error."""
    if device is None:
        return get_default_device()
    if not isinstance(device, str) or device not in DEVICES:  # `in` would compare an array elementwise
        raise DeviceError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cuda":
        _load_cupy()
    return device


def get_default_device():
    global _default_device
    if _default_device is None:
        device = os.environ.get("TINYATTN_DEVICE", "cpu") or "cpu"
        try:
            _default_device = check_device(device)
        except DeviceError as error:  # the user set no flag: say where the device came from
            raise DeviceError(f"TINYATTN_DEVICE={device}: {error}") from None
    return _default_device


def set_default_device(device):
    """Make `device` the device of new tensors that do not name one."""
    global _default_device
    _default_device = check_device(device)


def module_for(device):
    """The array module (numpy or cupy) of a device name."""
    return numpy if check_device(device) == "cpu" else _cupy


def array_module(array):
    """The array module that owns `array`: numpy for host arrays, cupy for GPU arrays."""
    if isinstance(array, numpy.ndarray):
        return numpy
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    raise TypeError(f"expected a numpy or cupy array, got {type(array).__name__}")


def device_of(array):
    return "cpu" if isinstance(array, numpy.ndarray) else "cuda"


_matmul_hooks = []  # see add_matmul_hook


def add_matmul_hook(hook):
    """Call `hook(a, b, seconds)` after every matrix product (the profiler times BLAS this
    way); returns a handle whose remove() detaches it."""
    return HookHandle(_matmul_hooks, hook)


def matmul(a, b, out=None):
    """a @ b: every op's matrix products go through here, so the profiler can time BLAS.

    out: an array to write the product into. It may be a strided view, such as one head's
    columns of a wider array: NumPy's BLAS path takes any row stride, so the product lands
    in place with no copy (the attention kernels use this to skip splitting heads)."""
    if not _matmul_hooks:
        return a @ b if out is None else array_module(a).matmul(a, b, out=out)
    start = time.perf_counter()
    result = a @ b if out is None else array_module(a).matmul(a, b, out=out)
    for hook in _matmul_hooks:
        hook(a, b, time.perf_counter() - start)
    return result


def ensure_array(value):
    """NumPy returns scalars, not 0-d arrays, from some operations on 0-d arrays; make them arrays."""
    return numpy.asarray(value) if isinstance(value, numpy.generic) else value


def is_array(value):
    return isinstance(value, numpy.ndarray) or (_cupy is not None and isinstance(value, _cupy.ndarray))


def to_host(array):
    """A numpy array with the data of `array` (a copy only when it lives on the GPU)."""
    return array if isinstance(array, numpy.ndarray) else _cupy.asnumpy(array)


def to_device(array, device):
    """`array` on `device` (a host array from a seeded generator, say); the only place
    where data crosses between host and GPU."""
    device = check_device(device)
    if device_of(array) == device:
        return array
    return to_host(array) if device == "cpu" else _cupy.asarray(array)


def read_scalars(*scalars):
    """Python floats of 0-d arrays (or numbers) on one device, read back in one transfer: one
    synchronisation with a GPU, not one per value."""
    arrays = [a for a in scalars if is_array(a)]
    if not arrays or device_of(arrays[0]) == "cpu":
        return [float(a) for a in scalars]
    return _cupy.stack([_cupy.asarray(a, dtype=float64) for a in scalars]).get().tolist()


def default_dtype_for(data):
    """float32 for Python floats, int64 for Python ints, bool for bools; arrays keep theirs."""
    if is_array(data) or isinstance(data, numpy.generic):
        return data.dtype
    kind = numpy.asarray(data).dtype.kind
    if kind == "f":
        return float32
    if kind in "iu":
        return int64
    if kind == "b":
        return bool_
    raise TypeError(f"cannot make a tensor from data of type {type(data).__name__} (dtype kind {kind!r})")


def as_array(data, dtype=None, device=None):
    """An array on `device` from Python data, a numpy or a cupy array."""
    dtype = numpy.dtype(dtype) if dtype is not None else default_dtype_for(data)
    if device is None:  # host data, numpy arrays included, goes to the default device, as in PyTorch; GPU arrays stay
        device = "cuda" if is_array(data) and device_of(data) == "cuda" else get_default_device()
    else:
        device = check_device(device)
    if is_array(data):
        data = to_device(numpy.asarray(data) if isinstance(data, numpy.ndarray) else data, device)  # memmap etc. -> ndarray
        return data if data.dtype == dtype else data.astype(dtype)
    return module_for(device).asarray(numpy.asarray(data, dtype=dtype))


SHARED_ALIGNMENT = 64  # bytes: each shared array starts on its own cache line


def shared_host_arrays(like):
    """Zeroed host arrays of the shapes and dtypes of the arrays `like`, all in one anonymous
    shared mapping: a process forked after this call sees the same memory, so what one
    process writes there the other reads without a copy (tinyattn.parallel's workers)."""
    offsets, size = [], 0
    for array in like:
        offsets.append(size)
        size += -(-array.nbytes // SHARED_ALIGNMENT) * SHARED_ALIGNMENT
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_SHARED)
    return [numpy.frombuffer(memory, dtype=array.dtype, count=array.size, offset=offset).reshape(array.shape)
            for array, offset in zip(like, offsets)]


def is_floating(dtype):
    return numpy.dtype(dtype).kind == "f"


def is_integer(dtype):
    return numpy.dtype(dtype).kind in "iu"


def as_dtype(dtype):
    return numpy.dtype(dtype)


def scatter_add(target, index, values):
    """target[index] += values, summing where `index` repeats an element (unbuffered)."""
    if isinstance(target, numpy.ndarray):
        numpy.add.at(target, index, values)
    else:
        _cupyx.scatter_add(target, index, values)


# splitmix64's constants, the stride between seeds and the two multipliers, as uint64 scalars:
# CuPy would refuse them as Python ints, which are above int64's range.
_GOLDEN = numpy.uint64(0x9E3779B97F4A7C15)
_MIX = (numpy.uint64(0xBF58476D1CE4E5B9), numpy.uint64(0x94D049BB133111EB))


def uniform_on(device, shape, generator):
    """Uniform float64 draws in [0, 1) of `shape`, made on `device` itself (no random numbers
    cross from the host) from one 64-bit seed that the host `generator` gives: element i is
    splitmix64's mix of seed + i * golden ratio. So the same generator state gives the same
    draws on every device, and the generator advances by one number per call."""
    xp = module_for(device)
    seed = numpy.uint64(generator.integers(0, 2 ** 63))
    z = xp.arange(math.prod(shape), dtype=uint64)
    z *= _GOLDEN
    z += seed
    for shift, multiplier in zip((30, 27), _MIX):
        z ^= z >> numpy.uint64(shift)
        z *= multiplier
    z ^= z >> numpy.uint64(31)
    return ((z >> 11).astype(float64) * 2.0 ** -53).reshape(shape)  # the top 53 bits, as a double's fraction


def generator(seed=None):
    """A seeded random generator; random tensors are drawn on the host and moved, so a
    seed gives the same numbers on every device."""
    return numpy.random.default_rng(seed)


def host_arange(start, stop, step, dtype):
    return numpy.arange(start, stop, step, dtype=dtype)
