"""Forward values against NumPy, first and second derivatives by finite differences, and dtypes, for every op."""
import math
import operator

import numpy as np
import pytest

import tinyattn as ta

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

# --- inputs -----------------------------------------------------------------------------

SEED = 1234


def normal(*shape, seed=0):
    """Float64 standard normal draws (0-d shapes give a 0-d array, never a Python float)."""
    return np.asarray(np.random.default_rng(SEED + seed).standard_normal(shape))


def positive(*shape, seed=0):
    return np.abs(normal(*shape, seed=seed)) + 0.5


def nonzero(*shape, seed=0):
    """Values with |x| in [0.3, 2): away from 0, and the clip bounds below are away too."""
    rng = np.random.default_rng(SEED + 100 + seed)
    magnitude = rng.choice([0.3, 0.7, 1.1, 1.6], size=shape) + rng.uniform(0, 0.15, size=shape)
    return np.asarray(magnitude * rng.choice([-1.0, 1.0], size=shape))


def leaf(array, requires_grad=True):
    """`array` as a tensor on the default device, which the device fixture sets."""
    return ta.tensor(array, requires_grad=requires_grad, device=ta.get_default_device())


def view_leaf(array, view):
    """A leaf over `view` of `array` on the default device, strides and all (ta.tensor would copy a view contiguous)."""
    return ta.Tensor(view(leaf(array).data), requires_grad=True)


def check_forward(result, expected, dtype=None):
    expected = np.asarray(expected)
    assert isinstance(result, ta.Tensor)
    assert result.shape == expected.shape
    assert result.dtype == (dtype if dtype is not None else expected.dtype)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)


def sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-x))


def gelu_np(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


# --- elementwise unary ops, including scalars on either side ----------------------------
# name: (tinyattn function, numpy function, input maker). Kinked ops use `nonzero` inputs,
# which keep away from 0 and from the clip bounds +-0.5.

UNARY = {
    "neg": (lambda x: -x, np.negative, normal),
    "neg_function": (lambda x: x.__neg__(), np.negative, normal),
    "exp": (ta.exp, np.exp, normal),
    "exp_method": (lambda x: x.exp(), np.exp, normal),
    "log": (ta.log, np.log, positive),
    "log_method": (lambda x: x.log(), np.log, positive),
    "sqrt": (ta.sqrt, np.sqrt, positive),
    "tanh": (ta.tanh, np.tanh, normal),
    "sigmoid": (ta.sigmoid, sigmoid_np, normal),
    "sigmoid_method": (lambda x: x.sigmoid(), sigmoid_np, normal),
    "relu": (ta.relu, lambda x: np.maximum(x, 0.0), nonzero),
    "gelu": (ta.gelu, gelu_np, normal),
    "abs": (ta.abs, np.abs, nonzero),
    "abs_builtin": (lambda x: abs(x), np.abs, nonzero),
    "clip": (lambda x: ta.clip(x, -0.5, 0.5), lambda x: np.clip(x, -0.5, 0.5), nonzero),
    "clip_low": (lambda x: x.clip(low=-0.5), lambda x: np.clip(x, -0.5, None), nonzero),
    "clip_high": (lambda x: x.clip(high=0.5), lambda x: np.clip(x, None, 0.5), nonzero),
    "add_scalar": (lambda x: x + 2, lambda x: x + 2, normal),
    "radd_scalar": (lambda x: 2.5 + x, lambda x: 2.5 + x, normal),
    "sub_scalar": (lambda x: x - 2, lambda x: x - 2, normal),
    "rsub_scalar": (lambda x: 2 - x, lambda x: 2 - x, normal),
    "mul_scalar": (lambda x: x * 3, lambda x: x * 3, normal),
    "rmul_scalar": (lambda x: -1.5 * x, lambda x: -1.5 * x, normal),
    "div_scalar": (lambda x: x / 4, lambda x: x / 4, normal),
    "rdiv_scalar": (lambda x: 2 / x, lambda x: 2 / x, nonzero),
    "pow_square": (lambda x: x ** 2, lambda x: x ** 2, normal),
    "pow_cube": (lambda x: x ** 3, lambda x: x ** 3, normal),
    "pow_fractional": (lambda x: x ** 1.5, lambda x: x ** 1.5, positive),
    "pow_negative": (lambda x: x ** -2.0, lambda x: x ** -2.0, nonzero),
    "rpow_scalar": (lambda x: 2 ** x, lambda x: 2.0 ** x, normal),
    "rpow_float": (lambda x: 0.5 ** x, lambda x: 0.5 ** x, normal),
    "maximum_scalar": (lambda x: ta.maximum(x, 0.2), lambda x: np.maximum(x, 0.2), nonzero),
    "minimum_scalar": (lambda x: ta.minimum(-0.2, x), lambda x: np.minimum(-0.2, x), nonzero),
}
UNARY_SHAPES = [(2, 3), (), (4,)]


@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=str)
@pytest.mark.parametrize("name", UNARY)
def test_unary_forward(name, shape):
    function, reference, make = UNARY[name]
    x = make(*shape)
    check_forward(function(leaf(x)), reference(x))


@pytest.mark.parametrize("shape", [(2, 3), ()], ids=str)
@pytest.mark.parametrize("name", UNARY)
def test_unary_gradcheck(name, shape):
    function, _, make = UNARY[name]
    assert ta.gradcheck(function, [leaf(make(*shape))])


# --- binary ops with broadcasting -------------------------------------------------------

BINARY = {
    "add": (operator.add, np.add, normal, normal),
    "sub": (operator.sub, np.subtract, normal, normal),
    "mul": (operator.mul, np.multiply, normal, normal),
    "div": (operator.truediv, np.divide, normal, nonzero),
    "pow": (operator.pow, np.power, positive, normal),
    "maximum": (ta.maximum, np.maximum, normal, normal),
    "minimum": (ta.minimum, np.minimum, normal, normal),
    "maximum_method": (lambda a, b: a.maximum(b), np.maximum, normal, normal),
}
BROADCAST_PAIRS = [
    ((2, 3), (2, 3)),
    ((3, 1, 4), (2, 4)),
    ((2, 4), (3, 1, 4)),
    ((1, 3), (2, 1)),
    ((2, 3), (1,)),
    ((1,), (2, 3)),
    ((2, 3), ()),
    ((), (2, 3)),
    ((), ()),
]


@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=str)
@pytest.mark.parametrize("name", BINARY)
def test_binary_forward(name, shapes):
    function, reference, make_a, make_b = BINARY[name]
    a, b = make_a(*shapes[0], seed=1), make_b(*shapes[1], seed=2)
    check_forward(function(leaf(a), leaf(b)), reference(a, b))


@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=str)
@pytest.mark.parametrize("name", BINARY)
def test_binary_gradcheck(name, shapes):
    function, _, make_a, make_b = BINARY[name]
    a, b = make_a(*shapes[0], seed=1), make_b(*shapes[1], seed=2)
    assert ta.gradcheck(function, [leaf(a), leaf(b)])


@pytest.mark.parametrize("name", ["add", "mul", "div", "pow", "maximum"])
def test_binary_gradcheck_one_side_only(name):
    """Only one operand requires grad: the other gets no gradient and the checked one is right."""
    function, _, make_a, make_b = BINARY[name]
    a, b = leaf(make_a(3, 1, 4, seed=1)), leaf(make_b(2, 4, seed=2), requires_grad=False)
    assert ta.gradcheck(function, [a, b])
    a2, b2 = leaf(make_a(3, 1, 4, seed=1), requires_grad=False), leaf(make_b(2, 4, seed=2))
    assert ta.gradcheck(function, [a2, b2])
    function(a2, b2).sum().backward()
    assert a2.grad is None and b2.grad.shape == (2, 4)


# --- matmul -----------------------------------------------------------------------------

MATMUL_SHAPES = [
    ((2, 3), (3, 4)),            # 2-D
    ((2, 2, 3), (2, 3, 4)),      # batched 3-D
    ((2, 1, 2, 3), (3, 3, 2)),   # 4-D with 3-D, batch dims (2,1) and (3,) broadcast
    ((1, 2, 3), (2, 3, 2)),      # batch 1 against 2
    ((3,), (3, 4)),              # 1-D @ 2-D
    ((2, 3), (3,)),              # 2-D @ 1-D
    ((3,), (3,)),                # 1-D @ 1-D
    ((2, 3, 4), (4, 5)),         # (B,T,K) @ (K,N)
    ((2, 2, 3, 4), (4, 2)),      # 4-D @ 2-D
    ((3, 4), (2, 4, 2)),         # 2-D @ 3-D
    ((4,), (2, 4, 3)),           # 1-D @ 3-D
    ((2, 3, 4), (4,)),           # 3-D @ 1-D
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_forward(shapes):
    a, b = normal(*shapes[0], seed=1), normal(*shapes[1], seed=2)
    check_forward(leaf(a) @ leaf(b), a @ b)
    check_forward(ta.matmul(leaf(a), leaf(b)), np.matmul(a, b))


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_gradcheck(shapes):
    a, b = normal(*shapes[0], seed=1), normal(*shapes[1], seed=2)
    assert ta.gradcheck(operator.matmul, [leaf(a), leaf(b)])


def test_matmul_rejects_mismatched_inner_dimension():
    with pytest.raises(ValueError):
        leaf(normal(2, 3)) @ leaf(normal(4, 2))


# --- reused inputs and non-contiguous inputs --------------------------------------------

REUSED = {
    "x*x": lambda x: x * x,
    "x+x": lambda x: x + x,
    "x-x*2": lambda x: x - x * 2,
    "x/x.exp()": lambda x: x / x.exp(),
    "x@x.T": lambda x: x @ x.T,
    "x.T@x": lambda x: x.T @ x,
    "x*x[0]": lambda x: x * x[0],
    "stack(x,x)": lambda x: ta.stack([x, x.exp()], axis=1),
}


@pytest.mark.parametrize("name", REUSED)
def test_reused_input_gradcheck(name):
    assert ta.gradcheck(REUSED[name], [leaf(normal(2, 3))])


def test_reused_input_gradient_values():
    x = leaf(normal(2, 3))
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy() + 1)
    y = leaf(normal(2, 3))
    (y @ y.T).sum().backward()
    # d/dY sum(Y Y^T) = (1 1^T) Y + (1 1^T)^T Y = 2 * column sums broadcast
    np.testing.assert_allclose(y.grad.numpy(), 2 * np.ones((2, 2)) @ y.numpy())


NONCONTIGUOUS = {
    "exp": lambda x: x.exp(),
    "matmul": lambda x: x @ x.T,
    "reshape": lambda x: x.reshape(-1) * ta.tensor(np.arange(x.size, dtype=np.float64), device=x.device),
    "transpose": lambda x: x.T * x.T,
    "sum_axis": lambda x: (x * x).sum(axis=0),
    "getitem": lambda x: x[::-1, 1:] * 2,
    "max": lambda x: x.max(axis=1),
}


def transposed(array):
    return array.T


def every_other_column(array):
    return array[:, ::2]


VIEWS = {"transposed": (transposed, (4, 3)), "strided": (every_other_column, (3, 6))}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("name", NONCONTIGUOUS)
def test_noncontiguous_input(name, view):
    make_view, shape = VIEWS[view]
    array = normal(*shape)
    x = view_leaf(array, make_view)
    assert not x.data.flags.c_contiguous
    check_forward(NONCONTIGUOUS[name](x), NONCONTIGUOUS[name](leaf(np.ascontiguousarray(make_view(array)))).numpy())
    assert ta.gradcheck(NONCONTIGUOUS[name], [x])


def test_noncontiguous_binary_operands():
    a, b = view_leaf(normal(4, 3), transposed), view_leaf(normal(3, 8), every_other_column)
    assert not a.data.flags.c_contiguous and not b.data.flags.c_contiguous
    assert ta.gradcheck(lambda a, b: a * b + a / (b * b + 1), [a, b])


# --- reductions -------------------------------------------------------------------------

REDUCTIONS = {
    "sum": (ta.sum, np.sum),
    "mean": (ta.mean, np.mean),
    "max": (ta.max, np.max),
    "min": (ta.min, np.min),
    "var": (ta.var, np.var),
    "var_ddof1": (lambda x, **kw: ta.var(x, ddof=1, **kw), lambda x, **kw: np.var(x, ddof=1, **kw)),
    "sum_method": (lambda x, **kw: x.sum(**kw), np.sum),
    "max_method": (lambda x, **kw: x.max(**kw), np.max),
}
AXES = [None, 0, 1, -1, (0, 2), (-1, 0), (0, 1, 2)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduction_forward(name, axis, keepdims):
    function, reference = REDUCTIONS[name]
    x = normal(2, 3, 4)
    check_forward(function(leaf(x), axis=axis, keepdims=keepdims), reference(x, axis=axis, keepdims=keepdims))


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduction_gradcheck(name, axis, keepdims):
    function, _ = REDUCTIONS[name]
    x = leaf(normal(2, 3, 4))
    assert ta.gradcheck(lambda x: function(x, axis=axis, keepdims=keepdims), [x])


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
def test_reduction_of_0d_and_1d(name):
    function, reference = REDUCTIONS[name]
    for x in (normal(), normal(5)):
        check_forward(function(leaf(x)), reference(x))
        assert ta.gradcheck(function, [leaf(x)])


@pytest.mark.parametrize("name", ["max", "min"])
def test_extremum_ties_split_gradient(name):
    x = leaf(np.array([[1.0, 3.0, 3.0], [-2.0, -2.0, 0.5]]))
    function = REDUCTIONS[name][0]
    function(x, axis=1).sum().backward()
    expected = {"max": [[0, 0.5, 0.5], [0, 0, 1]], "min": [[1, 0, 0], [0.5, 0.5, 0]]}[name]
    np.testing.assert_allclose(x.grad.numpy(), expected)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_argmax_argmin(name, axis, keepdims):
    x = normal(3, 4)
    result = getattr(ta, name)(leaf(x), axis=axis, keepdims=keepdims)
    check_forward(result, getattr(np, name)(x, axis=axis, keepdims=keepdims))
    assert result.dtype.kind == "i" and not result.requires_grad


# --- shape ops --------------------------------------------------------------------------

SHAPE_OPS = {
    "reshape_tuple": (lambda x: x.reshape((4, 6)), lambda x: x.reshape(4, 6)),
    "reshape_varargs": (lambda x: x.reshape(3, -1, 2), lambda x: x.reshape(3, -1, 2)),
    "reshape_flat": (lambda x: x.reshape(-1), lambda x: x.reshape(-1)),
    "transpose_axes": (lambda x: x.transpose(1, 0, 2), lambda x: x.transpose(1, 0, 2)),
    "transpose_tuple": (lambda x: x.transpose((2, 0, 1)), lambda x: x.transpose(2, 0, 1)),
    "transpose_negative": (lambda x: x.transpose(-1, 0, -2), lambda x: x.transpose(-1, 0, -2)),
    "transpose_none": (lambda x: x.transpose(), lambda x: x.transpose()),
    "swapaxes": (lambda x: x.swapaxes(0, 2), lambda x: x.swapaxes(0, 2)),
    "swapaxes_negative": (lambda x: x.swapaxes(-1, 0), lambda x: x.swapaxes(-1, 0)),
    "T": (lambda x: x.T, lambda x: x.T),
    "unsqueeze_0": (lambda x: x.unsqueeze(0), lambda x: x[None]),
    "unsqueeze_last": (lambda x: x.unsqueeze(-1), lambda x: x[..., None]),
    "unsqueeze_middle": (lambda x: x.unsqueeze(2), lambda x: np.expand_dims(x, 2)),
    "squeeze_all": (lambda x: x.reshape(1, 2, 1, 12).squeeze(), lambda x: x.reshape(1, 2, 1, 12).squeeze()),
    "squeeze_axis": (lambda x: x.reshape(1, 2, 1, 12).squeeze(2), lambda x: x.reshape(1, 2, 1, 12).squeeze(2)),
    "squeeze_tuple": (lambda x: x.reshape(1, 2, 1, 12).squeeze((0, 2)), lambda x: x.reshape(1, 2, 1, 12).squeeze((0, 2))),
    "squeeze_negative": (lambda x: x.reshape(2, 12, 1).squeeze(-1), lambda x: x.reshape(2, 12, 1).squeeze(-1)),
    "broadcast_to": (lambda x: x[:, :1].broadcast_to((2, 2, 3, 4)), lambda x: np.broadcast_to(x[:, :1], (2, 2, 3, 4))),
    "broadcast_to_same": (lambda x: x.broadcast_to((2, 3, 4)), lambda x: x),
    "expand_minus_one": (lambda x: x[:, :1].expand(-1, 3, -1), lambda x: np.broadcast_to(x[:, :1], (2, 3, 4))),
    "expand_new_dim": (lambda x: x[0, :1].expand(3, 2, 4), lambda x: np.broadcast_to(x[0, :1], (3, 2, 4))),
}


@pytest.mark.parametrize("name", SHAPE_OPS)
def test_shape_op_forward(name):
    function, reference = SHAPE_OPS[name]
    x = normal(2, 3, 4)
    check_forward(function(leaf(x)), reference(x))


@pytest.mark.parametrize("name", SHAPE_OPS)
def test_shape_op_gradcheck(name):
    function, _ = SHAPE_OPS[name]
    assert ta.gradcheck(function, [leaf(normal(2, 3, 4))])


def test_shape_op_errors():
    x = leaf(normal(2, 3))
    with pytest.raises(ValueError):
        x.squeeze(0)
    with pytest.raises(ValueError):
        x.transpose(0, 0)


# --- indexing ---------------------------------------------------------------------------
# The same index object is used on the Tensor and on the NumPy array.

INDICES = {
    "int": 1,
    "negative_int": -1,
    "ints_to_0d": (1, 2, 3),
    "slice": slice(1, 3),
    "step_slice": (slice(None), slice(None, None, 2)),
    "reverse_slice": (slice(None, None, -1), 0),
    "none": (slice(None), None, slice(1, None)),
    "ellipsis": (Ellipsis, 0),
    "ellipsis_none": (0, Ellipsis, None),
    "ellipsis_slice": (Ellipsis, slice(None, None, -2)),
    "int_array_repeats": np.array([0, 2, 0, 0]),
    "list_repeats": [2, 2, 1],
    "negative_int_array": np.array([-1, -1, 0]),
    "int_arrays_pair_repeats": (np.array([0, 1, 1, 1]), np.array([2, 2, 3, 2])),
    "slice_then_array": (slice(None), np.array([3, 3, 0])),
    "array_2d": np.array([[0, 1], [1, 1]]),
    "bool_mask": np.array([True, False, True]),
}


@pytest.mark.parametrize("name", INDICES)
def test_getitem_forward(name):
    index = INDICES[name]
    x = normal(3, 4, 5)
    check_forward(leaf(x)[index], x[index])


@pytest.mark.parametrize("name", INDICES)
def test_getitem_gradcheck(name):
    index = INDICES[name]
    assert ta.gradcheck(lambda x: x[index], [leaf(normal(3, 4, 5))])


@pytest.mark.parametrize("index_values", [[1, 1, 0, 2, 1], 2, [[0, 0], [2, 0]]], ids=["1d", "0d", "2d"])
def test_getitem_integer_tensor_index(index_values):
    x = normal(3, 4)
    index = ta.tensor(index_values)
    assert index.dtype == ta.int64
    check_forward(leaf(x)[index], x[np.asarray(index_values)])
    t = leaf(x)
    assert ta.gradcheck(lambda t: t[index], [t])


def test_getitem_repeated_indices_accumulate():
    x = leaf(normal(4, 2))
    x[np.array([1, 1, 3, 1])].sum().backward()
    expected = np.zeros((4, 2))
    expected[1] = 3
    expected[3] = 1
    np.testing.assert_array_equal(x.grad.numpy(), expected)
    y = leaf(normal(4, 2))
    (y[ta.tensor([0, 0])] * leaf(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=False)).sum().backward()
    np.testing.assert_array_equal(y.grad.numpy()[0], [4.0, 6.0])
    np.testing.assert_array_equal(y.grad.numpy()[1:], 0.0)


# --- joining and splitting --------------------------------------------------------------

JOINS = {
    "concatenate_axis0": (lambda a, b, c: ta.concatenate([a, b, c], axis=0), lambda a, b, c: np.concatenate([a, b, c], axis=0), [(1, 3), (2, 3), (3, 3)]),
    "concatenate_axis1": (lambda a, b, c: ta.concatenate([a, b, c], axis=1), lambda a, b, c: np.concatenate([a, b, c], axis=1), [(2, 1), (2, 3), (2, 2)]),
    "concatenate_axis_neg": (lambda a, b, c: ta.concatenate((a, b, c), axis=-1), lambda a, b, c: np.concatenate([a, b, c], axis=-1), [(2, 2, 1), (2, 2, 3), (2, 2, 2)]),
    "stack_axis0": (lambda a, b, c: ta.stack([a, b, c]), lambda a, b, c: np.stack([a, b, c]), [(2, 3)] * 3),
    "stack_axis1": (lambda a, b, c: ta.stack([a, b, c], axis=1), lambda a, b, c: np.stack([a, b, c], axis=1), [(2, 3)] * 3),
    "stack_axis_neg": (lambda a, b, c: ta.stack([a, b, c], axis=-1), lambda a, b, c: np.stack([a, b, c], axis=-1), [(2, 3)] * 3),
}


@pytest.mark.parametrize("name", JOINS)
def test_join_forward_and_gradcheck(name):
    function, reference, shapes = JOINS[name]
    arrays = [normal(*shape, seed=i) for i, shape in enumerate(shapes)]
    check_forward(function(*map(leaf, arrays)), reference(*arrays))
    assert ta.gradcheck(function, [leaf(a) for a in arrays])


SPLITS = [(2, 0, (4, 3)), ([1, 2], 1, (2, 4)), (3, -1, (2, 6)), ([0, 3], 0, (4, 2)), (1, 0, (2, 2))]


@pytest.mark.parametrize("sections,axis,shape", SPLITS, ids=str)
def test_split(sections, axis, shape):
    x = normal(*shape)
    parts = ta.split(leaf(x), sections, axis=axis)
    expected = np.split(x, sections, axis=axis)
    assert len(parts) == len(expected)
    for part, want in zip(parts, expected):
        check_forward(part, want)
    method_parts = leaf(x).split(sections, axis=axis)
    assert [p.shape for p in method_parts] == [p.shape for p in expected]
    assert ta.gradcheck(lambda t: tuple(ta.split(t, sections, axis=axis)), [leaf(x)])


def test_split_uses_each_part_once():
    x = leaf(normal(4, 3))
    a, b = ta.split(x, 2)
    (a * 2 + b * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[2] * 3, [2] * 3, [3] * 3, [3] * 3])


# --- where and masked_fill --------------------------------------------------------------

MASKS = {
    "full": np.array([[True, False, True], [False, False, True]]),
    "row": np.array([[True, False, True]]),
    "row_1d": np.array([False, True, True]),
    "column": np.array([[True], [False]]),
    "scalar": np.array(True),
    "bigger": np.array([[[True, False, True], [False, True, True]], [[False, False, True], [True, True, False]]]),
}


@pytest.mark.parametrize("mask", MASKS)
def test_where_forward_and_gradcheck(mask):
    condition = MASKS[mask]
    a, b = normal(2, 3, seed=1), normal(3, seed=2)
    cond = leaf(condition, requires_grad=False)
    check_forward(ta.where(cond, leaf(a), leaf(b)), np.where(condition, a, b))
    assert ta.gradcheck(lambda a, b: ta.where(cond, a, b), [leaf(a), leaf(b)])
    # A broadcast operand of shape (1,) and a Python scalar on the other side.
    c = normal(1, seed=3)
    check_forward(ta.where(cond, leaf(c), 0.5), np.where(condition, c, 0.5))
    assert ta.gradcheck(lambda c: ta.where(cond, -1.0, c), [leaf(c)])


@pytest.mark.parametrize("mask", MASKS)
def test_masked_fill_forward_and_gradcheck(mask):
    condition = MASKS[mask]
    x = normal(2, 3)
    cond = leaf(condition, requires_grad=False)
    expected = np.where(condition, -1e9, x)
    check_forward(ta.masked_fill(leaf(x), cond, -1e9), expected)
    check_forward(leaf(x).masked_fill(cond, -1e9), expected)
    assert ta.gradcheck(lambda t: ta.masked_fill(t, cond, 0.25), [leaf(x)])


def test_masked_fill_gradient_is_zero_where_masked():
    x = leaf(normal(2, 3))
    cond = leaf(MASKS["row"], requires_grad=False)
    x.masked_fill(cond, 7.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.broadcast_to(~MASKS["row"], (2, 3)).astype(float))


def test_where_needs_boolean_condition():
    with pytest.raises(TypeError):
        ta.where(ta.tensor([1, 0]), leaf(normal(2)), 0.0)


# --- comparisons ------------------------------------------------------------------------

COMPARISONS = ["__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"]


@pytest.mark.parametrize("name", COMPARISONS)
def test_comparisons(name):
    compare = getattr(operator, name.strip("_"))
    a = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    b = np.array([[1.0, 0.0, 4.0], [0.0, 2.0, 2.0]])
    x, y = leaf(a), leaf(b)
    for result, expected in [
        (compare(x, y), compare(a, b)),
        (compare(x, 2.0), compare(a, 2.0)),
        (compare(x, 2), compare(a, 2)),
        (compare(2.0, x), compare(2.0, a)),  # reflected: Python calls the mirrored method on x
        (compare(x, leaf(b[:1])), compare(a, b[:1])),  # broadcasting
    ]:
        assert result.dtype == ta.bool_
        assert not result.requires_grad
        np.testing.assert_array_equal(result.numpy(), expected)


# --- astype -----------------------------------------------------------------------------

@pytest.mark.parametrize("source,target", [("float64", "float32"), ("float32", "float64"), ("int64", "float32"),
                                           ("float64", "int64"), ("float64", "float64"), ("bool", "float32")])
def test_astype_forward(source, target):
    x = (normal(2, 3) * 3).astype(source)
    result = leaf(x, requires_grad=False).astype(target)
    assert result.dtype == np.dtype(target)
    np.testing.assert_array_equal(result.numpy(), x.astype(target))
    assert leaf(x, requires_grad=False).astype(getattr(ta, target)).dtype == np.dtype(target)


def test_astype_gradient():
    # Round-tripping through float32 is the identity up to float32 rounding, so use a coarse step.
    assert ta.gradcheck(lambda x: x.astype(ta.float32).astype(ta.float64) * 3.0, [leaf(normal(2, 3))],
                        eps=1e-2, atol=1e-4)
    x = leaf(normal(2, 3).astype(np.float32))
    (x.astype(ta.float64) * leaf(normal(2, 3, seed=1), requires_grad=False)).sum().backward()
    assert x.grad.dtype == ta.float32
    np.testing.assert_allclose(x.grad.numpy(), normal(2, 3, seed=1).astype(np.float32))
    assert not leaf(normal(2), requires_grad=False).astype(ta.int64).requires_grad
    assert not leaf(normal(2)).astype(ta.int64).requires_grad


# --- second order -----------------------------------------------------------------------

GRADGRAD = {
    "exp": ([(2, 3)], lambda x: x.exp(), normal),
    "log": ([(2, 3)], lambda x: x.log(), positive),
    "sqrt": ([(2, 3)], lambda x: x.sqrt(), positive),
    "tanh": ([(2, 3)], lambda x: x.tanh(), normal),
    "sigmoid": ([(2, 3)], lambda x: x.sigmoid(), normal),
    "gelu": ([(2, 3)], lambda x: x.gelu(), normal),
    "mul": ([(2, 3), (3,)], operator.mul, normal),
    "mul_reused": ([(2, 3)], lambda x: x * x * x, normal),
    "div": ([(2, 3), (2, 1)], operator.truediv, positive),
    "pow_scalar": ([(2, 3)], lambda x: x ** 3, normal),
    "pow_both": ([(2, 3), (2, 3)], operator.pow, positive),
    "rpow": ([(2, 3)], lambda x: 1.5 ** x, normal),
    "sum": ([(2, 3)], lambda x: x.sum(axis=1) ** 2, normal),
    "sum_all": ([(2, 3)], lambda x: x.sum() * x, normal),
    "mean": ([(2, 3)], lambda x: x.mean(axis=0, keepdims=True) * x, normal),
    "var": ([(2, 3)], lambda x: x.var(axis=1), normal),
    "var_all": ([(2, 3)], lambda x: x.var(), normal),
    "max": ([(2, 3)], lambda x: x.max(axis=1) * x.max(), normal),
    "matmul_2d": ([(2, 3), (3, 2)], operator.matmul, normal),
    "matmul_batched": ([(2, 2, 3), (2, 3, 2)], operator.matmul, normal),
    "matmul_broadcast": ([(2, 2, 3), (3, 2)], operator.matmul, normal),
    "matmul_reused": ([(2, 3)], lambda x: x @ x.T, normal),
}


@pytest.mark.parametrize("name", GRADGRAD)
def test_gradgradcheck(name):
    shapes, function, make = GRADGRAD[name]
    inputs = [leaf(make(*shape, seed=i)) for i, shape in enumerate(shapes)]
    assert ta.gradgradcheck(function, inputs)


def test_gradcheck_catches_a_wrong_gradient():
    """The checker itself must fail on a wrong backward, or the tests above prove nothing."""
    class WrongExp(ta.Function):
        def forward(self, x):
            return self.xp.exp(x)

        def backward(self, grad):
            return grad * self.output * 1.01

    with pytest.raises(ta.GradcheckError):
        ta.gradcheck(lambda x: WrongExp.apply(x), [leaf(normal(2, 3))])


# --- device synchronisation ---------------------------------------------------------------

def test_ops_and_their_gradients_read_nothing_back_from_the_device(sync_counter):
    """A read of device data on the host stalls a GPU until its queued work is done: no op may make one."""
    x, rows = leaf(normal(3, 4)), ta.tensor([2, 0, 2])
    peaks = (x[rows].exp() @ x.T).max(axis=1) + ta.where(x > 0, x, 0.0).var(axis=1)[rows]
    joined = ta.concatenate([peaks, ta.maximum(x, 0.1).min(axis=0), (x[:, ::2].sigmoid() / 3).reshape(-1)])
    (ta.stack([joined, joined.clip(-1, 1)]).mean() + abs(x).astype(ta.float32).sum()).backward()
    assert sync_counter.count == 0


# --- dtypes -----------------------------------------------------------------------------

FLOAT32_OPS = {
    "add_int": lambda x: x + 2, "radd_float": lambda x: 2.5 + x, "sub": lambda x: x - 1.5, "rsub": lambda x: 2 - x,
    "mul": lambda x: x * 3.0, "rmul": lambda x: 3 * x, "div": lambda x: x / 3, "rdiv": lambda x: 2 / x,
    "pow": lambda x: x ** 2, "pow_float": lambda x: abs(x) ** 0.5, "rpow": lambda x: 2 ** x,
    "numpy_scalar": lambda x: x * np.float64(2.0), "rnumpy_scalar": lambda x: np.float64(2.0) - x,
    "maximum": lambda x: ta.maximum(x, 0.0), "minimum": lambda x: ta.minimum(1, x),
    "clip": lambda x: x.clip(-0.5, 0.5), "where": lambda x: ta.where(x > 0, x, 0.0),
    "masked_fill": lambda x: x.masked_fill(x > 0, -1e9),
    "exp": ta.exp, "log": lambda x: abs(x).log(), "sqrt": lambda x: abs(x).sqrt(), "tanh": ta.tanh,
    "sigmoid": ta.sigmoid, "relu": ta.relu, "gelu": ta.gelu, "abs": ta.abs, "neg": lambda x: -x,
    "sum": lambda x: x.sum(axis=1), "mean": lambda x: x.mean(), "var": lambda x: x.var(axis=0),
    "max": lambda x: x.max(axis=0), "min": lambda x: x.min(),
    "matmul": lambda x: x @ x.T, "getitem": lambda x: x[[0, 0, 1]], "reshape": lambda x: x.reshape(-1),
    "transpose": lambda x: x.T, "concatenate": lambda x: ta.concatenate([x, x], axis=1),
    "stack": lambda x: ta.stack([x, x]), "broadcast_to": lambda x: x.broadcast_to((2, 2, 3)),
}


@pytest.mark.parametrize("name", FLOAT32_OPS)
def test_float32_stays_float32_and_grads_are_float32(name):
    function = FLOAT32_OPS[name]
    data = nonzero(2, 3)
    x32 = leaf(data.astype(np.float32))
    out32 = function(x32)
    assert out32.dtype == ta.float32
    out32.sum().backward()
    assert x32.grad.dtype == ta.float32
    assert x32.grad.shape == (2, 3)
    x64 = leaf(data.astype(np.float32).astype(np.float64))
    out64 = function(x64)
    assert out64.dtype == ta.float64
    np.testing.assert_allclose(out32.numpy(), out64.numpy(), rtol=1e-5, atol=1e-5)
    out64.sum().backward()
    np.testing.assert_allclose(x32.grad.numpy(), x64.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,reference", [(operator.add, np.add), (operator.sub, np.subtract), (operator.mul, np.multiply),
                                          (operator.truediv, np.divide), (ta.maximum, np.maximum), (ta.minimum, np.minimum)],
                         ids=["add", "sub", "mul", "div", "maximum", "minimum"])
@pytest.mark.parametrize("float_first", [True, False], ids=["f32_op_i64", "i64_op_f32"])
def test_float32_with_int64_tensor_is_float32(op, reference, float_first):
    x = leaf(nonzero(2, 3).astype(np.float32))
    n = leaf(np.array([[1, 2, 3], [-4, 5, 6]]), requires_grad=False)
    assert n.dtype == ta.int64
    result = op(x, n) if float_first else op(n, x)
    n32 = n.numpy().astype(np.float32)
    expected = reference(x.numpy(), n32) if float_first else reference(n32, x.numpy())
    assert result.dtype == ta.float32
    np.testing.assert_allclose(result.numpy(), np.asarray(expected), rtol=1e-6)
    assert result.requires_grad
    result.sum().backward()
    assert x.grad.dtype == ta.float32


def test_float32_matmul_with_int64_and_python_scalars():
    x = leaf(normal(2, 3).astype(np.float32))
    n = leaf(np.arange(6).reshape(3, 2), requires_grad=False)
    out = (x @ n) * 0.5 + 1
    assert out.dtype == ta.float32
    out.sum().backward()
    assert x.grad.dtype == ta.float32


def test_python_scalar_literals_default_dtypes():
    assert ta.tensor(1.5).dtype == ta.float32
    assert ta.tensor([1, 2]).dtype == ta.int64
    assert ta.tensor(normal(2)).dtype == ta.float64
    assert (ta.tensor(normal(2)) * 2.0).dtype == ta.float64
