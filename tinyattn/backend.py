"""The one module that imports NumPy or CuPy to compute on tensor data.

Everything else asks an array for its module (`array_module(array)`) and calls that,
so one code path serves both devices. CuPy is imported only when a CUDA tensor is
first asked for, so `import tinyattn` never touches a GPU.
"""
import os
import time

import numpy

float32 = numpy.dtype("float32")
float64 = numpy.dtype("float64")
int64 = numpy.dtype("int64")
bool_ = numpy.dtype("bool")

DEVICES = ("cpu", "cuda")
CUDA_INSTALL_HINT = "install the GPU extra in the tinyattn checkout with: pip install -e '.[cuda]' (needs an NVIDIA GPU and CUDA 12)"
NO_GPU_HINT = "check the NVIDIA driver with nvidia-smi, or use the cpu device"

_cupy = None
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
    global _cupy
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
        _cupy = cupy
    return _cupy


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
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cuda":
        _load_cupy()
    return device


def get_default_device():
    global _default_device
    if _default_device is None:
        _default_device = check_device(os.environ.get("TINYATTN_DEVICE", "cpu") or "cpu")
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
    device = check_device(device) if device is not None else (device_of(data) if is_array(data) else get_default_device())
    if is_array(data):
        data = to_device(numpy.asarray(data) if isinstance(data, numpy.ndarray) else data, device)  # memmap etc. -> ndarray
        return data if data.dtype == dtype else data.astype(dtype)
    return module_for(device).asarray(numpy.asarray(data, dtype=dtype))


def is_floating(dtype):
    return numpy.dtype(dtype).kind == "f"


def as_dtype(dtype):
    return numpy.dtype(dtype)


def scatter_add(target, index, values):
    """target[index] += values, summing where `index` repeats an element (unbuffered)."""
    if isinstance(target, numpy.ndarray):
        numpy.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)


def generator(seed=None):
    """A seeded random generator; random tensors are drawn on the host and moved, so a
    seed gives the same numbers on every device."""
    return numpy.random.default_rng(seed)


def host_arange(start, stop, step, dtype):
    return numpy.arange(start, stop, step, dtype=dtype)
