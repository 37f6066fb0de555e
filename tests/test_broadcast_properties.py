"""Property tests: binary ops on random broadcastable shape pairs agree with NumPy, forward and backward."""
import operator

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import tinyattn as ta

SHAPE_PAIRS = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=3)
SEEDS = st.integers(min_value=0, max_value=2 ** 32 - 1)
# Every test runs on cpu and on cuda (tests/conftest.py); a test's examples all share its device.
pytestmark = pytest.mark.usefixtures("device")


def device_tensor(array, requires_grad=False):
    """`array` as a tensor on the default device, which the device fixture sets."""
    return ta.tensor(array, requires_grad=requires_grad, device=ta.get_default_device())


def sum_to(array, shape):
    """Sum a broadcast array back down to `shape` (the adjoint of broadcasting), in NumPy."""
    lead = array.ndim - len(shape)
    array = array.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and array.shape[i] != 1)
    return array.sum(axis=axes, keepdims=True).reshape(shape)


# name: (tinyattn op, numpy op, d(out)/da, d(out)/db), derivatives as functions of broadcast a, b.
OPS = {
    "add": (operator.add, np.add, lambda a, b: np.ones_like(a), lambda a, b: np.ones_like(b)),
    "sub": (operator.sub, np.subtract, lambda a, b: np.ones_like(a), lambda a, b: -np.ones_like(b)),
    "mul": (operator.mul, np.multiply, lambda a, b: b, lambda a, b: a),
    "div": (operator.truediv, np.divide, lambda a, b: 1.0 / b, lambda a, b: -a / (b * b)),
    "maximum": (ta.maximum, np.maximum, lambda a, b: (a > b).astype(float), lambda a, b: (b > a).astype(float)),
    "minimum": (ta.minimum, np.minimum, lambda a, b: (a < b).astype(float), lambda a, b: (b < a).astype(float)),
}


def operands(shapes, seed, name):
    """Float64 operands of the drawn shapes; divisors kept away from zero, no near-ties for max/min."""
    rng = np.random.default_rng(seed)
    shape_a, shape_b = shapes.input_shapes
    a = np.asarray(rng.standard_normal(shape_a))
    b = np.asarray(rng.standard_normal(shape_b))
    if name == "div":
        b = np.sign(b) * (np.abs(b) + 0.5) + (b == 0)
    if name in ("maximum", "minimum"):
        assume(np.abs(np.subtract(a, b)).min(initial=np.inf) > 1e-3)
    return a, b


@pytest.mark.parametrize("name", OPS)
@settings(max_examples=30, deadline=None)
@given(shapes=SHAPE_PAIRS, seed=SEEDS)
def test_forward_matches_numpy(name, shapes, seed):
    function, reference, _, _ = OPS[name]
    a, b = operands(shapes, seed, name)
    result = function(device_tensor(a), device_tensor(b))
    expected = reference(a, b)
    assert result.shape == expected.shape == shapes.result_shape
    assert result.dtype == ta.float64
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", OPS)
@settings(max_examples=30, deadline=None)
@given(shapes=SHAPE_PAIRS, seed=SEEDS)
def test_gradients_have_operand_shapes_and_analytic_values(name, shapes, seed):
    function, _, d_a, d_b = OPS[name]
    a, b = operands(shapes, seed, name)
    upstream = np.asarray(np.random.default_rng(seed + 1).standard_normal(shapes.result_shape))
    ta_a, ta_b = device_tensor(a, requires_grad=True), device_tensor(b, requires_grad=True)
    out = function(ta_a, ta_b)
    out.backward(device_tensor(upstream))
    assert ta_a.grad.shape == a.shape
    assert ta_b.grad.shape == b.shape
    assert ta_a.grad.dtype == ta_b.grad.dtype == ta.float64
    a_full, b_full = np.broadcast_arrays(a, b)
    expected_a = sum_to(upstream * d_a(a_full, b_full), a.shape)
    expected_b = sum_to(upstream * d_b(a_full, b_full), b.shape)
    np.testing.assert_allclose(ta_a.grad.numpy(), expected_a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ta_b.grad.numpy(), expected_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
@settings(max_examples=30, deadline=None)
@given(shapes=SHAPE_PAIRS, seed=SEEDS)
def test_gradcheck(name, shapes, seed):
    function = OPS[name][0]
    a, b = operands(shapes, seed, name)
    assert ta.gradcheck(function, [device_tensor(a, requires_grad=True), device_tensor(b, requires_grad=True)])


def test_sum_to_helper():
    """The NumPy reference itself: summing a broadcast back gives the multiplicity of each element."""
    ones = np.ones((2, 3, 4))
    np.testing.assert_array_equal(sum_to(ones, (3, 1)), np.full((3, 1), 8.0))
    np.testing.assert_array_equal(sum_to(ones, ()), np.array(24.0))
    np.testing.assert_array_equal(sum_to(ones, (1, 3, 4)), np.full((1, 3, 4), 2.0))
