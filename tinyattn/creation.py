"""Making tensors: from data, filled with a value, ranges, and seeded random draws."""
import contextlib
import contextvars

from . import backend
from .engine import Tensor, expect_tensor

_default_generator = backend.generator()


def manual_seed(seed):
    """Seed the generator used when a random function is given none."""
    global _default_generator
    _default_generator = backend.generator(seed)
    return _default_generator


def default_generator():
    """The generator that random functions use when they are given none."""
    return _default_generator


_shard_generator = contextvars.ContextVar("tinyattn_shard_generator", default=None)


def shard_generator():
    """The generator that the random draws of a training step (dropout masks, randomized
    positions) take in this context, or None for each module's own (see drawing_from)."""
    return _shard_generator.get()


@contextlib.contextmanager
def drawing_from(generator):
    """Take every dropout mask and randomized position in the block from `generator` instead
    of the modules' own (None: the modules' own): each shard of a batch gets its own
    (tinyattn.parallel), so threads never share one."""
    token = _shard_generator.set(generator)
    try:
        yield generator
    finally:
        _shard_generator.reset(token)


def tensor(data, dtype=None, requires_grad=False, device=None):
    """A tensor from Python data or an array, always with its own copy of the data (as
    torch.tensor does), so that in-place updates never reach the caller's array.

    Python floats become float32, Python ints int64 (as in PyTorch), bools bool; numpy
    and cupy arrays keep their dtype. The device defaults to the default device (as in
    PyTorch), except that a cupy array stays on the GPU.
    """
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_array(data):
        data = data.copy()
    return Tensor(data, dtype=dtype, requires_grad=requires_grad, device=device)


def _shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)


def full(shape, fill_value, dtype=None, device=None, requires_grad=False):
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    dtype = backend.as_dtype(dtype) if dtype is not None else backend.default_dtype_for(fill_value)
    device = backend.check_device(device)
    return Tensor(backend.module_for(device).full(shape, fill_value, dtype=dtype), device=device, requires_grad=requires_grad)


def zeros(*shape, dtype=backend.float32, device=None, requires_grad=False):
    return full(_shape(shape), 0, dtype=dtype, device=device, requires_grad=requires_grad)


def ones(*shape, dtype=backend.float32, device=None, requires_grad=False):
    return full(_shape(shape), 1, dtype=dtype, device=device, requires_grad=requires_grad)


def zeros_like(other, dtype=None, requires_grad=False):
    expect_tensor(other, "zeros_like's input")
    return full(other.shape, 0, dtype=dtype or other.dtype, device=other.device, requires_grad=requires_grad)


def ones_like(other, dtype=None, requires_grad=False):
    expect_tensor(other, "ones_like's input")
    return full(other.shape, 1, dtype=dtype or other.dtype, device=other.device, requires_grad=requires_grad)


def arange(start, stop=None, step=1, dtype=None, device=None):
    """Like numpy.arange; int64 for integer arguments, float32 when any is a float."""
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        dtype = backend.default_dtype_for([start, stop, step])
    return Tensor(backend.host_arange(start, stop, step, backend.as_dtype(dtype)), device=device or backend.get_default_device())


def _floating(function, dtype):
    dtype = backend.as_dtype(dtype)
    if not backend.is_floating(dtype):
        raise TypeError(f"{function} draws floating-point values: dtype must be a float type (float16, float32, float64), got {dtype}")
    return dtype


def randn(*shape, generator=None, dtype=backend.float32, device=None, requires_grad=False):
    """Standard normal draws from `generator` (a seeded tinyattn.Generator), else the default one.
    The generator draws float32 or float64; float16 values are float32 draws rounded."""
    rng = generator or _default_generator
    dtype = _floating("randn", dtype)
    if dtype in (backend.float32, backend.float64):
        values = rng.standard_normal(_shape(shape), dtype=dtype)
    else:
        values = rng.standard_normal(_shape(shape), dtype=backend.float32).astype(dtype)
    return Tensor(values, device=device or backend.get_default_device(), requires_grad=requires_grad)


def rand(*shape, generator=None, dtype=backend.float32, device=None, requires_grad=False):
    """Uniform draws in [0, 1). float16 values are k / 2**11 for a uniform integer k < 2**11
    (every float16 step in [0.5, 1)): a float32 draw rounded to float16 could become 1.0."""
    rng = generator or _default_generator
    dtype = _floating("rand", dtype)
    if dtype in (backend.float32, backend.float64):
        values = rng.random(_shape(shape), dtype=dtype)
    elif dtype == backend.float16:
        values = rng.integers(0, 2 ** 11, size=_shape(shape)).astype(dtype) * 2.0 ** -11
    else:  # wider than float64 (longdouble): float64 draws are exact in it
        values = rng.random(_shape(shape), dtype=backend.float64).astype(dtype)
    return Tensor(values, device=device or backend.get_default_device(), requires_grad=requires_grad)


def Generator(seed=None):  # noqa: N802 (reads like torch.Generator at the call site)
    """A seeded random generator for randn, rand, init functions and dropout."""
    return backend.generator(seed)


def empty_parameter_data(shape, dtype=backend.float32, device=None):
    """Uninitialised storage for a parameter that an init function fills next."""
    return backend.module_for(device).empty(shape, dtype=backend.as_dtype(dtype))
