"""A strict stand-in for CuPy, so that tests run tinyattn's device="cuda" path on a machine without a GPU.

It computes with NumPy underneath but keeps CuPy's boundary: its arrays are their own type,
not numpy.ndarray, and reaching the data from the host is an error unless it is an explicit
transfer (`a.get()`, `asnumpy(a)`). NumPy functions refuse its arrays (real CuPy would run
some of them on the GPU; library code must ask the array for its module instead), and so do
operators and functions given a NumPy array among device arrays. One case is stricter than
CuPy: a NumPy scalar on the left of an operator (numpy.float32(2) * a) is a NumPy ufunc call
here, so it fails too. Each read of device data on the host, which on a GPU waits for the
queued kernels, is counted: see `syncs` and `count_syncs`.

Only the test suite installs it, through tinyattn.backend._use_cuda_module (tests/conftest.py).
"""
import contextlib
import operator
import types

import numpy

float32, float64, int64, bool_ = numpy.float32, numpy.float64, numpy.int64, numpy.bool_

IMPLICIT_CONVERSION = "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
PYTHON_SCALARS = (bool, int, float, complex)
# CuPy must read a value back to know the size of these results, so they synchronise too.
SIZED_BY_VALUES = frozenset({"nonzero", "argwhere", "flatnonzero", "unique", "extract", "compress"})

_sync_count = 0


def syncs():
    """How many times device data has been read on the host so far."""
    return _sync_count


class SyncCount:
    """The synchronisations made inside one `count_syncs()` block (so far, while it runs)."""

    def __init__(self):
        self.start, self.end = _sync_count, None

    @property
    def count(self):
        return (_sync_count if self.end is None else self.end) - self.start


@contextlib.contextmanager
def count_syncs():
    counter = SyncCount()
    try:
        yield counter
    finally:
        counter.end = _sync_count


def _synchronize():
    global _sync_count
    _sync_count += 1


# --- crossing between the stand-in and NumPy ------------------------------------------------

def _wrap(value):
    """NumPy results as device arrays: scalars become 0-d arrays, as CuPy's reductions give."""
    if isinstance(value, numpy.ndarray):
        return ndarray(value)
    if isinstance(value, numpy.generic):
        return ndarray(numpy.asarray(value))
    if type(value) in (tuple, list):
        return type(value)(map(_wrap, value))
    return value


def _unwrap(value):
    """Arguments for NumPy: device arrays (also inside lists and tuples) as the host arrays they wrap."""
    if isinstance(value, ndarray):
        return value._host
    if isinstance(value, numpy.ndarray):
        raise TypeError(f"Unsupported type {type(value)}")  # CuPy's words for a host array among device ones
    if type(value) in (tuple, list):
        return type(value)(map(_unwrap, value))
    return value


def _operand(value):
    """The other operand of an operator: a device array or a scalar, as CuPy accepts."""
    if isinstance(value, ndarray):
        return value._host
    if isinstance(value, PYTHON_SCALARS + (numpy.generic,)):
        return value
    raise TypeError(f"Unsupported type {type(value)}")


def _index(key, shape):
    """`key`, an index into an array of `shape`, for NumPy. Host index arrays and lists are allowed
    (CuPy copies them over). Integer arrays wrap around out-of-range entries instead of raising,
    as CuPy's do: checking them would read them back from the GPU."""
    items = [item._host if isinstance(item, ndarray) else numpy.asarray(item) if isinstance(item, list) else item
             for item in (key if isinstance(key, tuple) else (key,))]
    spans = [0 if item is None or item is Ellipsis else item.ndim if getattr(item, "dtype", None) == bool_ else 1
             for item in items]
    axis = 0
    for position, (item, span) in enumerate(zip(items, spans)):
        if item is Ellipsis:
            span = len(shape) - sum(spans)
        elif isinstance(item, numpy.ndarray) and item.dtype.kind in "iu":
            items[position] = item % shape[axis]
        axis += span
    return tuple(items)


def _is_mask(key):
    return any(getattr(item, "dtype", None) == bool_ for item in (key if isinstance(key, tuple) else (key,)))


def _call(function, args, kwargs):
    """function(*args, **kwargs) on the host arrays; `out=` is handed back as the same device array."""
    result = function(*_unwrap(args), **{name: _unwrap(value) for name, value in kwargs.items()})
    out = kwargs.get("out")
    if isinstance(out, ndarray) and result is out._host:
        return out
    return _wrap(result)


# --- the array ------------------------------------------------------------------------------

class ndarray:  # noqa: N801 (CuPy's name)
    """A device array: a NumPy array (or a view, sharing its memory) behind CuPy's boundary."""

    __slots__ = ("_host",)
    __hash__ = None  # unhashable, as NumPy's and CuPy's arrays are (== is elementwise)

    def __init__(self, host):
        self._host = host

    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    itemsize = property(lambda self: self._host.itemsize)
    nbytes = property(lambda self: self._host.nbytes)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: self._host.flags)
    T = property(lambda self: ndarray(self._host.T))
    base = property(lambda self: None if self._host.base is None else _wrap(self._host.base))

    def __len__(self):
        return len(self._host)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key):
        if _is_mask(key):
            _synchronize()
        return _wrap(self._host[_index(key, self.shape)])

    def __setitem__(self, key, value):
        self._host[_index(key, self.shape)] = value._host if isinstance(value, ndarray) else value

    # NumPy must not see the data: it would compute on the host (or, on a GPU, fail).
    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT_CONVERSION)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        raise TypeError(f"numpy.{ufunc.__name__} was called on a device array; use the array's module (cupy), "
                        f"or move the data to the host explicitly with .get()")

    def __array_function__(self, function, kinds, args, kwargs):
        raise TypeError(f"{function.__module__}.{function.__name__} was called on a device array; use the array's "
                        f"module (cupy), or move the data to the host explicitly with .get()")

    # Each of these waits for the device: they read values on the host, or need them to size the result (nonzero).
    def get(self, stream=None, order="C", out=None):
        _synchronize()
        return numpy.array(self._host, order=order)

    def item(self, *args):
        _synchronize()
        return self._host.item(*args)

    def tolist(self):
        _synchronize()
        return self._host.tolist()

    def nonzero(self):
        _synchronize()
        return _wrap(self._host.nonzero())

    def __bool__(self):
        _synchronize()
        return bool(self._host)

    def __int__(self):
        _synchronize()
        return int(self._host)

    def __float__(self):
        _synchronize()
        return float(self._host)

    def __complex__(self):
        _synchronize()
        return complex(self._host)

    def __index__(self):
        _synchronize()
        return operator.index(self._host)

    def __repr__(self):
        _synchronize()
        return repr(self._host)

    def __str__(self):
        _synchronize()
        return str(self._host)

    def __format__(self, spec):
        _synchronize()
        return format(self._host, spec)


def _method(name):
    def method(self, *args, **kwargs):
        return _call(getattr(self._host, name), args, kwargs)
    method.__name__ = name
    return method


for _name in ("all", "any", "argmax", "argmin", "astype", "clip", "copy", "cumsum", "dot", "fill", "flatten", "max",
              "mean", "min", "prod", "ravel", "repeat", "reshape", "squeeze", "std", "sum", "swapaxes", "take",
              "transpose", "var", "view"):
    setattr(ndarray, _name, _method(_name))


def _binary(function):
    return lambda self, other: _wrap(function(self._host, _operand(other)))


def _reflected(function):
    return lambda self, other: _wrap(function(_operand(other), self._host))


def _unary(function):
    return lambda self: _wrap(function(self._host))


def _in_place(function):
    def update(self, other):
        function(self._host, _operand(other))  # NumPy updates the host array (a view writes through to its base)
        return self
    return update


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift"):
    _function, _name = getattr(operator, _name), _name.rstrip("_")
    setattr(ndarray, f"__{_name}__", _binary(_function))
    setattr(ndarray, f"__r{_name}__", _reflected(_function))
    setattr(ndarray, f"__i{_name}__", _in_place(getattr(operator, f"i{_name}")))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name)))  # device booleans: nothing is read yet
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__", _unary(getattr(operator, _name)))


# --- the module's functions -------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    """A device array of `a`; host data is copied over, as to a GPU."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray(numpy.array(a, dtype=dtype, order=order or "K"))


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """A device array of `obj`, a copy unless `copy=False` allows otherwise."""
    if isinstance(obj, ndarray):
        return ndarray(numpy.array(obj._host, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return ndarray(numpy.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None):
    """`a` on the host: a copy of a device array, a host array as it is."""
    return a.get(order=order) if isinstance(a, ndarray) else numpy.asarray(a, order=order)


def _device_function(name, function):
    def device_function(*args, **kwargs):
        if name in SIZED_BY_VALUES:
            _synchronize()
        return _call(function, args, kwargs)
    device_function.__name__ = name
    return device_function


def __getattr__(name):
    """Any other NumPy name: functions run on the wrapped arrays; dtypes and constants are NumPy's own, as in CuPy."""
    if name.startswith("_"):  # not NumPy's __path__, __all__ and the like: this is no package of NumPy's
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(numpy, name)
    if callable(value) and not isinstance(value, type):
        value = globals()[name] = _device_function(name, value)
    return value


class Generator:
    """cupy.random.Generator's draws, from a seeded NumPy generator, as device arrays."""

    def __init__(self, seed=None):
        self._host = numpy.random.default_rng(seed)

    def random(self, size=None, dtype=float64):
        return asarray(self._host.random(size, dtype=dtype))

    def standard_normal(self, size=None, dtype=float64):
        return asarray(self._host.standard_normal(size, dtype=dtype))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float64):
        return asarray(self._host.uniform(_unwrap(low), _unwrap(high), size), dtype=dtype)

    def integers(self, low, high=None, size=None, dtype=int64, endpoint=False):
        return asarray(self._host.integers(_unwrap(low), _unwrap(high), size, dtype=dtype, endpoint=endpoint))


random = types.SimpleNamespace(default_rng=Generator, Generator=Generator)
__version__ = "stand-in"
# What tinyattn and benchmarks/gpu_check.py ask of cupy.cuda: one card, its name, the CUDA
# versions (as CuPy encodes them: 12080 is 12.8), and the current device to wait for.
_device = types.SimpleNamespace(id=0, synchronize=_synchronize)
cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda index: {"name": b"CuPy stand-in"},
                                  runtimeGetVersion=lambda: 12080, driverGetVersion=lambda: 13000),
    Device=lambda index=0: _device)


def _scatter_add(a, slices, value):
    """cupyx.scatter_add: a[slices] += value, summing where indices repeat."""
    numpy.add.at(a._host, _index(slices, a.shape), _operand(value))


cupyx = types.SimpleNamespace(scatter_add=_scatter_add)  # what tinyattn uses of CuPy's companion package
