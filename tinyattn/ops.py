"""Every differentiable operation, each a small Function with forward beside backward.

`forward` computes on raw arrays with `self.xp` (numpy or cupy, whichever owns the
inputs). `backward` receives the output's gradient as a Tensor and returns the inputs'
gradients written with Tensor ops, so that backward can itself be differentiated.
Gradients may keep the broadcast shape of the output: the engine sums them back to
each input's shape in one place (`engine._reduce_to_input`).
"""
import builtins
import math
import operator
import sys

from . import backend, engine

# This module defines sum, max, min, abs and pow as tensor ops; the builtins stay reachable as builtins.max etc.
from .engine import Function, Tensor


def constant(array):
    """An array as a Tensor that takes no part in differentiation (masks, saved values)."""
    return Tensor._from_array(backend.ensure_array(array))


def _lift(value, like):
    """A Tensor for `value`; Python numbers take the dtype and device of `like`."""
    if isinstance(value, Tensor):
        return value
    if backend.is_array(value):  # an array keeps its device: one on another device is an error, never a silent copy
        return Tensor(value, device=backend.device_of(value))
    dtype = like.dtype if like.dtype.kind == "f" else backend.default_dtype_for(value)
    return constant(like.xp.asarray(value, dtype=dtype))


def _promote(a, b):
    """Cast an integer operand to the other's float dtype (NumPy would give float64)."""
    kind_a, kind_b = a.dtype.kind, b.dtype.kind
    if kind_a == "f" and kind_b in "iu":
        b = b.astype(a.dtype)
    elif kind_b == "f" and kind_a in "iu":
        a = a.astype(b.dtype)
    return a, b


def _binary(function_class, a, b):
    if not isinstance(a, Tensor):
        a = _lift(a, b)
    b = _lift(b, a)
    a, b = _promote(a, b)
    return function_class.apply(a, b)


def _normalize_axes(axis, ndim):
    """`axis` (None, an int or a tuple) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    normalized = []
    for ax in axes:
        if not -ndim <= ax < builtins.max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
        normalized.append(ax % ndim if ndim else 0)
    return tuple(sorted(normalized))


def _keepdims_shape(shape, axes):
    return tuple(1 if i in axes else size for i, size in enumerate(shape))


# --- arithmetic ------------------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, grad):
        return grad, grad


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, grad):
        return grad, -grad


class Mul(Function):
    def forward(self, a, b):
        return a * b

    def backward(self, grad):
        a, b = self.inputs
        need_a, need_b = self.needs_input_grad
        return (grad * b if need_a else None), (grad * a if need_b else None)


class Div(Function):
    def forward(self, a, b):
        return a / b

    def backward(self, grad):
        a, b = self.inputs
        need_a, need_b = self.needs_input_grad
        return (grad / b if need_a else None), (-grad * a / (b * b) if need_b else None)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, grad):
        return -grad


class Pow(Function):
    def forward(self, base, exponent):
        return base ** exponent

    def backward(self, grad):
        base, exponent = self.inputs
        need_base, need_exponent = self.needs_input_grad
        grad_base = grad * exponent * base ** (exponent - 1) if need_base else None
        grad_exponent = grad * self.output * base.log() if need_exponent else None
        return grad_base, grad_exponent


class MatMul(Function):
    """Batched matrix product with broadcast batch dimensions; 1-D operands as in NumPy."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul needs operands with at least one dimension")
        inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if a.shape[-1] != inner_b:
            raise ValueError(f"the contracted dimensions differ ({a.shape[-1]} != {inner_b})")
        if a.ndim > 2 and b.ndim <= 2:
            # One large GEMM (or GEMV) over all rows; NumPy would run one per batch entry.
            return backend.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + b.shape[1:])
        return backend.matmul(a, b)

    def backward(self, grad):
        a, b = self.inputs
        need_a, need_b = self.needs_input_grad
        # View 1-D operands as matrices (a row, b a column) so that one rule covers all cases.
        a2 = a.reshape(1, -1) if a.ndim == 1 else a
        b2 = b.reshape(-1, 1) if b.ndim == 1 else b
        batch_ndim = builtins.max(a2.ndim, b2.ndim) - 2
        grad2 = grad.reshape(grad.shape[:batch_ndim] + (a2.shape[-2], b2.shape[-1]))
        grad_a = grad_b = None
        if need_a:
            grad_a = grad2 @ b2.swapaxes(-1, -2)
            if a.ndim == 1:
                grad_a = grad_a.sum_to(a2.shape).reshape(a.shape)
        if need_b:
            if a2.ndim > 2 and b2.ndim == 2:
                # The weight gradient as one GEMM over the flattened batch, not a batched product and a sum.
                grad_b = a2.reshape(-1, a2.shape[-1]).T @ grad2.reshape(-1, grad2.shape[-1])
            else:
                grad_b = a2.swapaxes(-1, -2) @ grad2
            if b.ndim == 1:
                grad_b = grad_b.sum_to(b2.shape).reshape(b.shape)
        return grad_a, grad_b


# --- the products of layers: a linear map and a table lookup -----------------------------

class Linear(Function):
    """x @ weight.T + bias as one Function: a single 2-D GEMM over all rows of x, whatever
    its batch shape. Its backward is written in Tensor ops, so it differentiates twice."""

    def forward(self, x, weight, bias=None):
        out = backend.matmul(x.reshape(-1, x.shape[-1]), weight.T)
        if bias is not None:
            out += bias
        return out.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, grad):
        x, weight = self.inputs[:2]
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = (rows @ weight).reshape(x.shape) if self.needs_input_grad[0] else None
        grad_weight = rows.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None
        if len(self.inputs) == 2:
            return grad_x, grad_weight
        # The column sum as a product with a ones vector: much faster than a reduction in NumPy.
        ones = constant(grad.xp.ones(rows.shape[0], dtype=grad.dtype))
        return grad_x, grad_weight, ones @ rows


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight of shape (out_features, in_features) as in PyTorch."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} has {x.shape[-1]} features, weight {weight.shape} expects {weight.shape[1]}")
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


class Embedding(Function):
    """Rows of a table picked by integer ids. The gradient of the table is one-hot(ids)^T @ grad,
    one GEMM, where scattering with numpy.add.at is several times slower."""

    def forward(self, weight, ids):
        self.ids = ids
        return weight[ids]

    def backward(self, grad):
        weight = self.inputs[0]
        one_hot = self.xp.eye(weight.shape[0], dtype=grad.dtype)[self.ids.reshape(-1)]
        return constant(one_hot).T @ grad.reshape(-1, weight.shape[1])


def check_ids_in_range(ids, size, what):
    """IndexError naming the first of the integer array `ids` outside [0, size), `what` saying
    what they index. Only where reading ids is free, on the host: on a GPU it would stop the
    device on every call, so ids bound for a GPU are checked where they are made
    (tinyattn.tasks' batches, train.py's --decode)."""
    if ids.size and backend.device_of(ids) == "cpu":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise IndexError(f"{what}: id {low if low < 0 else high} is out of range [0, {size})")


def embedding(ids, weight):
    """Rows of `weight` picked by integer `ids` (any shape); ids outside the table are an
    error (see check_ids_in_range)."""
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    check_ids_in_range(ids.data, weight.shape[0], f"token ids for an embedding table of {weight.shape[0]} rows")
    return Embedding.apply(weight, ids=ids.data)


# --- elementwise -----------------------------------------------------------------------

class Exp(Function):
    def forward(self, x):
        return self.xp.exp(x)

    def backward(self, grad):
        return grad * self.output


class Log(Function):
    def forward(self, x):
        return self.xp.log(x)

    def backward(self, grad):
        return grad / self.inputs[0]


class Sqrt(Function):
    def forward(self, x):
        return self.xp.sqrt(x)

    def backward(self, grad):
        return grad / (2.0 * self.output)


class Tanh(Function):
    def forward(self, x):
        return self.xp.tanh(x)

    def backward(self, grad):
        y = self.output
        return grad * (1.0 - y * y)


class Sigmoid(Function):
    def forward(self, x):
        # tanh form: no overflow for large |x|, unlike 1 / (1 + exp(-x)).
        return 0.5 * self.xp.tanh(0.5 * x) + 0.5

    def backward(self, grad):
        y = self.output
        return grad * y * (1.0 - y)


class ReLU(Function):
    def forward(self, x):
        return x * (x > 0)

    def backward(self, grad):
        # The mask is a constant: relu'' is zero wherever it is defined.
        return grad * constant(self.inputs[0].data > 0)


GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GELU(Function):
    """GELU in its tanh form (GPT-2, PyTorch approximate='tanh'): NumPy has no erf."""

    def forward(self, x):
        return 0.5 * x * (1.0 + self.xp.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x)))

    def backward(self, grad):
        x = self.inputs[0]
        t = (GELU_SCALE * (x + GELU_CUBIC * x * x * x)).tanh()
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
        return grad * slope


class Abs(Function):
    def forward(self, x):
        return self.xp.abs(x)

    def backward(self, grad):
        return grad * constant(self.xp.sign(self.inputs[0].data))


class Clip(Function):
    def forward(self, x, low, high):
        self.low, self.high = low, high
        return self.xp.clip(x, low, high)

    def backward(self, grad):
        x = self.inputs[0].data
        inside = (x >= self.low) if self.low is not None else True
        if self.high is not None:
            inside = inside & (x <= self.high)
        return grad * constant(self.xp.asarray(inside))


class Maximum(Function):
    def forward(self, a, b):
        return self.xp.maximum(a, b)

    def backward(self, grad):
        # Ties share the gradient equally, as in PyTorch.
        a, b = (t.data for t in self.inputs)
        share_a = constant((a > b) + 0.5 * (a == b))
        return grad * share_a, grad * (1.0 - share_a)


class Minimum(Function):
    def forward(self, a, b):
        return self.xp.minimum(a, b)

    def backward(self, grad):
        a, b = (t.data for t in self.inputs)
        share_a = constant((a < b) + 0.5 * (a == b))
        return grad * share_a, grad * (1.0 - share_a)


# --- reductions ------------------------------------------------------------------------

class Sum(Function):
    def forward(self, x, axis, keepdims):
        self.axes = _normalize_axes(axis, x.ndim)
        self.keepdims = keepdims
        return x.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, grad):
        x = self.inputs[0]
        if not self.keepdims:
            grad = grad.reshape(_keepdims_shape(x.shape, self.axes))
        return grad.broadcast_to(x.shape)


class _Extremum(Function):
    """max or min over axes; the gradient goes to the elements that attain it, split between ties."""

    reduce = None

    def forward(self, x, axis, keepdims):
        self.axes = _normalize_axes(axis, x.ndim)
        if x.size == 0:
            raise ValueError(f"{type(self).__name__.lower()}() of an empty tensor of shape {x.shape}")
        extreme = getattr(x, self.reduce)(axis=self.axes, keepdims=True)
        attains = x == extreme
        self.share = attains / attains.sum(axis=self.axes, keepdims=True, dtype=x.dtype)
        return extreme if keepdims else extreme.reshape([n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, grad):
        x = self.inputs[0]
        return grad.reshape(_keepdims_shape(x.shape, self.axes)) * constant(self.share)


class Max(_Extremum):
    reduce = "max"


class Min(_Extremum):
    reduce = "min"


# --- shape and indexing ----------------------------------------------------------------

class Reshape(Function):
    def forward(self, x, shape):
        return x.reshape(shape)

    def backward(self, grad):
        return grad.reshape(self.inputs[0].shape)


class Transpose(Function):
    def forward(self, x, axes):
        self.axes = tuple(reversed(range(x.ndim))) if axes is None else axes
        return x.transpose(self.axes)

    def backward(self, grad):
        inverse = [0] * len(self.axes)
        for position, axis in enumerate(self.axes):
            inverse[axis] = position
        return grad.transpose(*inverse)


class BroadcastTo(Function):
    def forward(self, x, shape):
        return self.xp.broadcast_to(x, shape)

    def backward(self, grad):
        return grad.sum_to(self.inputs[0].shape)


class SumTo(Function):
    """Sum a broadcast array back down to `shape`: the inverse of broadcasting."""

    def forward(self, x, shape):
        lead = x.ndim - len(shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
        return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)

    def backward(self, grad):
        return grad.broadcast_to(self.inputs[0].shape)


def _is_advanced(index):
    return any(backend.is_array(item) for item in index)


class GetItem(Function):
    def forward(self, x, index):
        self.index = index
        return x[index]

    def backward(self, grad):
        return ScatterAdd.apply(grad, index=self.index, shape=self.inputs[0].shape)


class ScatterAdd(Function):
    """Zeros of `shape` with `x` added at `index`: the gradient of indexing.

    Integer-array indices may repeat an element (an embedding lookup does), so those
    contributions are summed; slices never repeat, so a plain assignment serves.
    """

    def forward(self, x, index, shape):
        self.index = index
        out = self.xp.zeros(shape, dtype=x.dtype)
        if _is_advanced(index):
            backend.scatter_add(out, index, x)
        else:
            out[index] = x
        return out

    def backward(self, grad):
        return grad[self.index]


class Concatenate(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        return self.xp.concatenate(arrays, axis=axis)

    def backward(self, grad):
        grads, start = [], 0
        for tensor in self.inputs:
            stop = start + tensor.shape[self.axis]
            grads.append(grad[(slice(None),) * self.axis + (slice(start, stop),)])
            start = stop
        return tuple(grads)


class Where(Function):
    def forward(self, condition, a, b):
        return self.xp.where(condition, a, b)

    def backward(self, grad):
        condition = self.inputs[0].data
        need_a, need_b = self.needs_input_grad[1:]
        # A product with the mask, not where(): several times faster in NumPy.
        return None, (grad * constant(condition) if need_a else None), (grad * constant(~condition) if need_b else None)


class Cast(Function):
    def forward(self, x, dtype):
        return x.astype(dtype)

    def backward(self, grad):
        return grad.astype(self.inputs[0].dtype)


class ToDevice(Function):
    def forward(self, x, device):
        return backend.to_device(x, device)

    def backward(self, grad):
        return grad.to(self.inputs[0].device)


# --- the functional API and the Tensor methods built on it -----------------------------

def add(a, b):
    return _binary(Add, a, b)


def sub(a, b):
    return _binary(Sub, a, b)


def mul(a, b):
    return _binary(Mul, a, b)


def div(a, b):
    """True division; two integer operands give float32, as in PyTorch (NumPy would give float64)."""
    if not isinstance(a, Tensor):
        a = _lift(a, b)
    b = _lift(b, a)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        a, b = a.astype(backend.float32), b.astype(backend.float32)
    return _binary(Div, a, b)


def pow(a, b):  # noqa: A001 (mirrors the operator's name, as numpy.power would)
    return _binary(Pow, a, b)


def matmul(a, b):
    return _binary(MatMul, a, b)


def maximum(a, b):
    return _binary(Maximum, a, b)


def minimum(a, b):
    return _binary(Minimum, a, b)


def neg(x):
    return Neg.apply(x)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def tanh(x):
    return Tanh.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def relu(x):
    return ReLU.apply(x)


def gelu(x):
    return GELU.apply(x)


def abs(x):  # noqa: A001
    return Abs.apply(x)


def clip(x, low=None, high=None):
    if low is None and high is None:
        raise ValueError("clip() needs low, high or both")
    return Clip.apply(x, low=low, high=high)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    axes = _normalize_axes(axis, x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    return x.sum(axis=axes, keepdims=keepdims) * (1.0 / count)


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance as NumPy computes it: ddof=0 by default (PyTorch's default is ddof=1)."""
    axes = _normalize_axes(axis, x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    centered = x - x.mean(axis=axes, keepdims=True)
    return (centered * centered).sum(axis=axes, keepdims=keepdims) * (1.0 / (count - ddof))


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return Min.apply(x, axis=axis, keepdims=keepdims)


def argmax(x, axis=None, keepdims=False):
    return constant(x.data.argmax(axis=axis, keepdims=keepdims))


def argmin(x, axis=None, keepdims=False):
    return constant(x.data.argmin(axis=axis, keepdims=keepdims))


def reshape(x, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, *axes):
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    if axes and sorted(a % x.ndim for a in axes) != list(range(x.ndim)):
        raise ValueError(f"transpose axes {tuple(axes)} are not a permutation of the {x.ndim} axes of shape {x.shape}")
    return Transpose.apply(x, axes=tuple(a % x.ndim for a in axes) if axes else None)


def swapaxes(x, axis1, axis2):
    axes = list(range(x.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return Transpose.apply(x, axes=tuple(axes))


def squeeze(x, axis=None):
    axes = _normalize_axes(axis, x.ndim) if axis is not None else tuple(i for i, n in enumerate(x.shape) if n == 1)
    for ax in axes:
        if x.shape[ax] != 1:
            raise ValueError(f"cannot squeeze axis {ax} of shape {x.shape}: its size is {x.shape[ax]}, not 1")
    return x.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))


def unsqueeze(x, axis):
    if not -x.ndim - 1 <= axis <= x.ndim:
        raise ValueError(f"unsqueeze axis {axis} is out of range for a tensor with {x.ndim} dimensions")
    axis = axis % (x.ndim + 1)
    return x.reshape(x.shape[:axis] + (1,) + x.shape[axis:])


def broadcast_to(x, shape):
    shape = tuple(shape)
    if x.shape == shape:
        return x
    return BroadcastTo.apply(x, shape=shape)


def expand(x, *shape):
    """PyTorch's expand: broadcast_to where -1 keeps the existing size."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    lead = len(shape) - x.ndim
    return broadcast_to(x, tuple(x.shape[i - lead] if n == -1 else n for i, n in enumerate(shape)))


def sum_to(x, shape):
    shape = tuple(shape)
    if x.shape == shape:
        return x
    return SumTo.apply(x, shape=shape)


def _index_item(item, tensor):
    """One index element on the tensor's device: Tensors and lists become arrays there."""
    if isinstance(item, Tensor):
        if item.device != tensor.device:
            raise backend.DeviceError(f"index tensor on {item.device} used to index a tensor on {tensor.device}")
        return item.data
    if isinstance(item, list) or backend.is_array(item):
        return backend.as_array(item, device=tensor.device)
    return item


def getitem(x, index):
    index = tuple(_index_item(item, x) for item in (index if isinstance(index, tuple) else (index,)))
    return GetItem.apply(x, index=index)


def concatenate(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate() needs at least one tensor")
    axis = _normalize_axes(axis, tensors[0].ndim)[0]
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack() needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack() needs tensors of one shape, got {sorted(shapes)}")
    return concatenate([t.unsqueeze(axis) for t in tensors], axis=axis)


def split(x, indices_or_sections, axis=0):
    """NumPy's split: into equal sections, or at the given indices; a list of views."""
    axis = _normalize_axes(axis, x.ndim)[0]
    length = x.shape[axis]
    if isinstance(indices_or_sections, int):
        if indices_or_sections <= 0 or length % indices_or_sections:
            raise ValueError(f"split(): axis {axis} of size {length} does not divide into {indices_or_sections} equal sections")
        step = length // indices_or_sections
        bounds = list(range(0, length + 1, step))
    else:
        bounds = [0, *indices_or_sections, length]
    prefix = (slice(None),) * axis
    return [x[prefix + (slice(start, stop),)] for start, stop in zip(bounds[:-1], bounds[1:])]


def where(condition, a, b):
    if not isinstance(condition, Tensor) or condition.dtype != backend.bool_:
        raise TypeError(f"where() needs a boolean condition tensor, got {getattr(condition, 'dtype', type(condition).__name__)}")
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else condition
    a, b = _promote(_lift(a, like), _lift(b, like))
    return Where.apply(condition, a, b)


def masked_fill(x, mask, value):
    """`x` with `value` wherever `mask` is True (mask broadcasts to x's shape)."""
    return where(mask, value, x)


def astype(x, dtype):
    dtype = backend.as_dtype(dtype)
    return x if x.dtype == dtype else Cast.apply(x, dtype=dtype)


def to(x, device):
    device = backend.check_device(device)
    return x if x.device == device else ToDevice.apply(x, device=device)


def _comparison(compare):
    def compare_elementwise(a, b):
        b = _lift(b, a)
        if a.device != b.device:
            raise backend.DeviceError(f"comparison of tensors on different devices ({a.device} and {b.device})")
        return constant(compare(a.data, b.data))
    return compare_elementwise


equal = _comparison(operator.eq)
not_equal = _comparison(operator.ne)
less = _comparison(operator.lt)
less_equal = _comparison(operator.le)
greater = _comparison(operator.gt)
greater_equal = _comparison(operator.ge)

engine.ops = sys.modules[__name__]  # Tensor's methods call the functions above (see engine.ops)
