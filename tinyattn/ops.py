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
from .engine import Function, Tensor, expect_tensor


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


def _first_operand(a, b, name):
    """`a`, not a Tensor, as one: a number takes the dtype and device of `b`, which must then be a tensor."""
    if not isinstance(b, Tensor) and not backend.is_array(a):
        raise TypeError(f"{name}() needs a tensor operand, got {type(a).__name__} and {type(b).__name__}")
    return _lift(a, b)


def _binary(function_class, a, b):
    if not isinstance(a, Tensor):
        a = _first_operand(a, b, function_class.__name__.lower())
    b = _lift(b, a)
    a, b = _promote(a, b)
    return function_class.apply(a, b)


def _int(value, name):
    """`value` as an int (a numpy integer or a one-element integer tensor will do), or a TypeError naming it."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _axis(ax, ndim, name="axis"):
    """One axis as a non-negative int, or a clear error. A 0-d tensor takes 0 or -1 (as in
    PyTorch), which come back as 0."""
    ax, n = _int(ax, name), builtins.max(ndim, 1)
    if not -n <= ax < n:
        raise ValueError(f"{name} {ax} is out of range for a tensor with {ndim} dimensions (expected an int in [{-n}, {n - 1}])")
    return ax % n


def _normalize_axes(axis, ndim):
    """`axis` (None, an int or a tuple of ints) as a sorted tuple of distinct non-negative
    axes. () reduces nothing, as in NumPy; a 0-d tensor has no axis to reduce."""
    if axis is None:
        return tuple(range(ndim))
    axes = [_axis(ax, ndim) for ax in (axis if isinstance(axis, (tuple, list)) else (axis,))]
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {tuple(axis)} names an axis twice")
    return tuple(sorted(axes)) if ndim else ()


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
    """base ** exponent for two tensors (a Python number as the exponent takes PowScalar).

    At base 0 the textbook rules give 0 * inf. There the gradients are PyTorch's: 0 for the
    base where the exponent is 0, and 0 for the exponent where the exponent is at least 0.
    The rules compute those places at base 1 instead (1 ** e is finite and ln 1 = 0), rather
    than selecting 0 afterwards, so that they stay finite when differentiated again.
    """

    def forward(self, base, exponent):
        return base ** exponent

    def backward(self, grad):
        base, exponent = self.inputs
        need_base, need_exponent = self.needs_input_grad
        at_zero = base.data == 0
        grad_base = grad_exponent = None
        if need_base:
            safe = where(constant(at_zero & (exponent.data == 0)), 1.0, base)
            grad_base = grad * exponent * safe ** (exponent - 1)
        if need_exponent:
            safe = where(constant(at_zero & (exponent.data >= 0)), 1.0, base)
            grad_exponent = grad * self.output * safe.log()
        return grad_base, grad_exponent


class PowScalar(Function):
    """x ** exponent for a Python number, the common x ** 2: nothing to mask. Its rule's
    x ** (exponent - 1) is again a PowScalar, so it differentiates to any order."""

    def forward(self, x, exponent):
        self.exponent = exponent
        return x ** exponent

    def backward(self, grad):
        if self.exponent == 0:  # x ** 0 is constant; the rule would give 0 * inf at x = 0
            return constant(self.xp.zeros_like(grad.data))
        return grad * self.exponent * self.inputs[0] ** (self.exponent - 1)


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
    """max or min over axes; the gradient goes to the elements that attain it, split evenly
    between ties (PyTorch's amax rule), and to the NaNs of a slice that has any (its max)."""

    reduce = None

    def forward(self, x, axis, keepdims):
        self.axes = _normalize_axes(axis, x.ndim)
        if x.size == 0 and any(x.shape[a] == 0 for a in self.axes):
            raise ValueError(f"{type(self).__name__.lower()}() over an axis of size 0 (shape {x.shape}) has no value")
        return getattr(x, self.reduce)(axis=self.axes, keepdims=keepdims)

    def backward(self, grad):
        x = self.inputs[0].data
        # Found again from the input, not read from the output, which item assignment may have changed since.
        extreme = getattr(x, self.reduce)(axis=self.axes, keepdims=True)
        # NumPy's extreme of a slice with a NaN is NaN, which equals nothing: the NaNs attain it.
        attains = (x == extreme) | self.xp.isnan(x)
        share = attains / attains.sum(axis=self.axes, keepdims=True, dtype=x.dtype)
        return grad.reshape(extreme.shape) * constant(share)


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


class SetItem(Function):
    """`x` with `value` written at `index`: the op `x[index] = value` records (Tensor.__setitem__).
    It writes into a copy, so x's old array stays with the ops that used it before; in_place (only
    when nothing is recorded) writes into x's own array, as NumPy does."""

    def forward(self, x, value, index, in_place=False):
        self.index = index
        out = x if in_place else x.copy()
        out[index] = value
        return out

    def backward(self, grad):
        need_x, need_value = self.needs_input_grad
        grad_x = grad_value = None
        if need_x:  # the written positions no longer depend on x
            kept = self.xp.ones(grad.shape, dtype=bool)
            kept[self.index] = False
            grad_x = grad * constant(kept)
        if need_value:  # value was broadcast to x[index]: the engine sums it back to value's shape
            grad_value, ndim = grad[self.index], self.inputs[1].ndim
            if grad_value.ndim < ndim:  # NumPy also drops a value's leading 1s
                grad_value = grad_value.reshape((1,) * (ndim - grad_value.ndim) + grad_value.shape)
        return grad_x, grad_value


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


def scattered_rows(xp, part, rows, count):
    """An array of `count` rows of zeros with `part`'s rows written at the (distinct) indices `rows`."""
    out = xp.zeros((count,) + part.shape[1:], dtype=part.dtype)
    out[rows] = part
    return out


class TakeRows(Function):
    """The rows of x at `rows`, distinct indices in increasing order: a padded batch's token rows
    packed together (tinyattn.packing). Its gradient puts them back, with no sum to make."""

    def forward(self, x, rows):
        self.rows = rows
        return x[rows]

    def backward(self, grad):
        return PutRows.apply(grad, rows=self.rows, count=self.inputs[0].shape[0])


class PutRows(Function):
    """`count` rows of zeros with x's rows written at `rows` (distinct): packed rows back in
    their padded layout (tinyattn.packing). Its gradient takes those rows again."""

    def forward(self, x, rows, count):
        self.rows = rows
        return scattered_rows(self.xp, x, rows, count)

    def backward(self, grad):
        return TakeRows.apply(grad, rows=self.rows)


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
        a = _first_operand(a, b, "div")
    b = _lift(b, a)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        a, b = a.astype(backend.float32), b.astype(backend.float32)
    return _binary(Div, a, b)


def pow(a, b):  # noqa: A001 (mirrors the operator's name, as numpy.power would)
    if type(b) in (int, float) and isinstance(a, Tensor) and a.dtype.kind == "f":
        return PowScalar.apply(a, exponent=b)  # a Python number keeps the tensor's dtype, as _lift would
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


def _reciprocal(count):
    """1 / count, and inf for a count of 0 or less: a sum times it is then inf, or nan for a
    sum of 0 (over no elements, say), as PyTorch gives, where 1 / 0 would raise."""
    return 1.0 / count if count > 0 else math.inf


def mean(x, axis=None, keepdims=False):
    """The mean; over no elements it is nan, as in PyTorch. NumPy's RuntimeWarning for that
    nan (invalid value in multiply) is not silenced, as np.mean warns of an empty slice."""
    axes = _normalize_axes(axis, expect_tensor(x, "mean's input").ndim)
    count = math.prod(x.shape[a] for a in axes)
    return x.sum(axis=axes, keepdims=keepdims) * _reciprocal(count)


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance as NumPy computes it: ddof=0 by default (PyTorch's default is ddof=1, its
    correction). With ddof at or above the count there are no degrees of freedom left: the
    variance is inf, or nan where the values are all equal (over no elements, say), as in
    PyTorch, never negative. NumPy's RuntimeWarning for a nan is not silenced (see mean)."""
    axes = _normalize_axes(axis, expect_tensor(x, "var's input").ndim)
    count = math.prod(x.shape[a] for a in axes)
    centered = x - x.mean(axis=axes, keepdims=True)
    return (centered * centered).sum(axis=axes, keepdims=keepdims) * _reciprocal(count - ddof)


def std(x, axis=None, keepdims=False, ddof=0):
    """The standard deviation, the square root of var with the same ddof (so inf or nan as var is).
    Where the values are all equal its gradient is 0, as in PyTorch, not sqrt's inf * 0: the
    root is taken of 1 there and 0 selected, so that nothing inf enters the backward."""
    variance = var(x, axis, keepdims, ddof)
    equal = constant(variance.data == 0)
    return where(equal, 0.0, where(equal, 1.0, variance).sqrt())


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return Min.apply(x, axis=axis, keepdims=keepdims)


def _index_of(which, x, axis, keepdims):
    """argmax or argmin (`which`, the array method's name) as a constant tensor."""
    axis = None if axis is None else _axis(axis, expect_tensor(x, f"{which}'s input").ndim)
    return constant(getattr(expect_tensor(x, f"{which}'s input").data, which)(axis=axis, keepdims=keepdims))


def argmax(x, axis=None, keepdims=False):
    """The index of the largest element, over the flattened tensor or along one axis (an int)."""
    return _index_of("argmax", x, axis, keepdims)


def argmin(x, axis=None, keepdims=False):
    """The index of the smallest element, over the flattened tensor or along one axis (an int)."""
    return _index_of("argmin", x, axis, keepdims)


def reshape(x, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, *axes):
    """The axes permuted as NumPy's transpose does (all of them, in their new order), or reversed."""
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    if not axes:
        return Transpose.apply(x, axes=None)
    axes = tuple(_axis(a, x.ndim, "transpose axis") for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"transpose axes {axes} are not a permutation of the {x.ndim} axes of shape {x.shape}")
    return Transpose.apply(x, axes=axes)


def swapaxes(x, axis1, axis2):
    axis1, axis2 = _axis(axis1, x.ndim, "axis1"), _axis(axis2, x.ndim, "axis2")
    axes = list(range(x.ndim))
    if axes:  # a 0-d tensor's axis 0 is no axis: nothing to swap
        axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return Transpose.apply(x, axes=tuple(axes))


def squeeze(x, axis=None):
    axes = _normalize_axes(axis, x.ndim) if axis is not None else tuple(i for i, n in enumerate(x.shape) if n == 1)
    for ax in axes:
        if x.shape[ax] != 1:
            raise ValueError(f"cannot squeeze axis {ax} of shape {x.shape}: its size is {x.shape[ax]}, not 1")
    return x.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))


def unsqueeze(x, axis):
    if not -x.ndim - 1 <= _int(axis, "unsqueeze axis") <= x.ndim:
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
    if lead < 0:
        raise ValueError(f"expand: shape {tuple(shape)} has fewer dimensions than the tensor's shape {x.shape}")
    if -1 in shape[:lead]:
        raise ValueError(f"expand: shape {tuple(shape)} has -1 for a new leading dimension, which has no size to keep")
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


def _index(index, x):
    return tuple(_index_item(item, x) for item in (index if isinstance(index, tuple) else (index,)))


def getitem(x, index):
    return GetItem.apply(x, index=_index(index, x))


def setitem(x, index, value, in_place=False):
    """`x` with `value` at `index`, a new tensor: `x[index] = value` records this and makes x that
    tensor (Tensor.__setitem__). in_place writes into x's array instead, unrecorded."""
    return SetItem.apply(x, _lift(value, x), index=_index(index, x), in_place=in_place)


def _tensor_list(tensors, name):
    """`tensors` as a non-empty list of Tensors, or an error saying which item is not one."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name}() needs at least one tensor")
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name}() needs a sequence of tensors, got {type(tensor).__name__} at position {position}")
    return tensors


def concatenate(tensors, axis=0):
    tensors = _tensor_list(tensors, "concatenate")
    if tensors[0].ndim == 0:
        raise ValueError("concatenate() needs tensors with at least one dimension, got a 0-d tensor (stack() joins those)")
    return Concatenate.apply(*tensors, axis=_axis(axis, tensors[0].ndim))


def stack(tensors, axis=0):
    tensors = _tensor_list(tensors, "stack")
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack() needs tensors of one shape, got {sorted(shapes)}")
    return concatenate([t.unsqueeze(axis) for t in tensors], axis=axis)


def split(x, indices_or_sections, axis=0):
    """NumPy's split: into equal sections, or at the given indices; a list of views."""
    if x.ndim == 0:
        raise ValueError("split() needs a tensor with at least one dimension, got a 0-d tensor")
    axis = _axis(axis, x.ndim)
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
