"""Ops at their edges (issue 14): base 0 in pow, NaN in max/min, reductions over nothing or
over a 0-d tensor, no degrees of freedom left in var, one-element tensors as Python numbers,
and clear errors for mistakes. Compared against PyTorch in float64 where it is installed."""
import math

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import functional as F

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

NAN = math.nan


def leaf(values, requires_grad=True):
    return ta.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad, device=ta.get_default_device())


def derivatives(library, function, *values):
    """(output, first derivatives, sums of second derivatives) of sum(function(*inputs)), each
    input's as numpy arrays; `library` is "ta" or "torch". The second derivatives are those
    of the sum of each first derivative, with respect to every input."""
    if library == "torch":
        import torch
        inputs = [torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for v in values]
        grad, to_numpy = torch.autograd.grad, lambda t: t.detach().numpy()
    else:
        inputs = [leaf(v) for v in values]
        grad, to_numpy = ta.grad, lambda t: t.numpy()
    output = function(*inputs)
    firsts = grad(output.sum(), inputs, create_graph=True, allow_unused=True)
    seconds = []
    for first in firsts:
        if first is None or not first.requires_grad:
            seconds.append([None] * len(inputs))
            continue
        row = grad(first.sum(), inputs, retain_graph=True, allow_unused=True)
        seconds.append([None if h is None else to_numpy(h) for h in row])
    return to_numpy(output), [to_numpy(g) for g in firsts], seconds


def zeros_for_none(rows, values):
    return [[np.zeros(np.shape(v)) if h is None else h for h, v in zip(row, values)] for row in rows]


# --- 1. pow at base 0 --------------------------------------------------------------------

ZERO = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
EXPONENTS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, -1.0]
POW_AT_ZERO = {
    "x**0": (lambda x: x ** 0, [[0.0, 2.0, -1.5]]),
    "x**zero_tensor": (lambda x: x ** (x * 0.0).detach(), [[0.0, 2.0, -1.5]]),
    "base**exponent": (lambda b, e: b ** e, [ZERO, EXPONENTS]),
    "x**(x+2)": (lambda x: x ** (x + 2), [[0.0, 1.0, 0.5]]),
    "0.0**x": (lambda x: 0.0 ** x, [[0.0, 0.5, 2.0, -1.0]]),
    "zero_tensor**x": (lambda x: (x * 0.0).detach() ** x, [[0.0, 0.5, 2.0, -1.0]]),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's warnings for the infinities of 0 ** -1
@pytest.mark.parametrize("name", POW_AT_ZERO)
def test_pow_at_base_zero_matches_torch(name):
    """First derivatives are PyTorch's, with no NaN (0 where the exponent is 0, for the base;
    0 where the base is 0 and the exponent at least 0, for the exponent). Second derivatives
    are PyTorch's wherever PyTorch gives a number."""
    pytest.importorskip("torch")
    function, values = POW_AT_ZERO[name]
    out, firsts, seconds = derivatives("ta", function, *values)
    out_t, firsts_t, seconds_t = derivatives("torch", function, *values)
    np.testing.assert_array_equal(out, out_t)
    for first, first_t in zip(firsts, firsts_t):
        assert not np.isnan(first).any()
        np.testing.assert_allclose(first, first_t, rtol=1e-12, atol=0)
    for row, row_t in zip(zeros_for_none(seconds, values), zeros_for_none(seconds_t, values)):
        for second, second_t in zip(row, row_t):
            known = ~np.isnan(second_t)
            np.testing.assert_allclose(second[known], second_t[known], rtol=1e-12, atol=0)


def test_pow_second_derivatives_at_base_zero_are_the_limits():
    """Where PyTorch's second derivative is NaN, the named cases give the true value:
    x ** (x + 2) has f''(0) = 2 (from the right); 0 ** x is constant for x > 0; x ** 0 is constant."""
    for function, x, expected in [(lambda x: x ** (x + 2), [0.0], [2.0]), (lambda x: 0.0 ** x, [0.5, 2.0], [0.0, 0.0]),
                                  (lambda x: x ** (x * 0.0).detach(), [0.0], [0.0])]:
        _, _, seconds = derivatives("ta", function, x)
        np.testing.assert_allclose(seconds[0][0], expected, rtol=1e-12, atol=0)


def test_pow_with_a_zero_exponent_tensor_differentiates_twice():
    """At exponent 0 and base 2 the function is smooth: finite differences of the first
    derivatives agree (PyTorch's mixed derivative there is 0 one way round and 0.5 the other)."""
    base, exponent = leaf([2.0, 0.5]), leaf([0.0, 0.0])
    assert ta.gradgradcheck(lambda b, e: b ** e, [base, exponent])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 ** -1.5 and (-1.3) ** 0.5 in the dtype checks
def test_pow_with_a_python_number_keeps_dtype_and_differentiates_twice():
    x = leaf([0.0, 0.7, -1.3])
    for exponent in (0, 1, 2, 3, -1.5, 0.5):
        assert (x.astype(ta.float32) ** exponent).dtype == ta.float32
    assert ta.gradgradcheck(lambda x: x ** 3 + x ** 1 + x ** 0, [x])


# --- 2. max and min with NaN ---------------------------------------------------------------

NAN_ROWS = [[1.0, NAN, 3.0], [2.0, 5.0, -5.0], [NAN, 0.5, 1.0]]


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_gradient_goes_to_the_nan(name):
    torch = pytest.importorskip("torch")
    x = leaf(NAN_ROWS)
    getattr(x, name)(axis=1).sum().backward()
    xt = torch.tensor(NAN_ROWS, dtype=torch.float64, requires_grad=True)
    getattr(xt, name)(dim=1).values.sum().backward()  # one NaN a row: the gradient goes to it
    np.testing.assert_array_equal(x.grad.numpy(), xt.grad.numpy())


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_of_all_splits_between_nans(name):
    torch = pytest.importorskip("torch")
    x = leaf(NAN_ROWS)
    getattr(x, name)().backward()
    xt = torch.tensor(NAN_ROWS, dtype=torch.float64, requires_grad=True)
    getattr(xt, name)().backward()  # the full reduction splits between the two NaNs
    np.testing.assert_array_equal(x.grad.numpy(), xt.grad.numpy())


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_ties_still_split_evenly(name):
    """tinyattn's convention, PyTorch's amax/amin rule (its max(dim) gives all to one index)."""
    torch = pytest.importorskip("torch")
    values = [[1.0, 3.0, 3.0], [-2.0, -2.0, 0.5], [4.0, 4.0, 4.0]]
    x = leaf(values)
    getattr(x, name)(axis=1).sum().backward()
    xt = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    getattr(torch, "a" + name)(xt, dim=1).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-15)


# --- 3. var with no degrees of freedom, mean over nothing ----------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's for 0 * inf (not silenced: ops.mean's docstring)
@pytest.mark.filterwarnings("ignore::UserWarning")  # PyTorch's "degrees of freedom is <= 0"
@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]], ids=["spread", "equal"])
@pytest.mark.parametrize("ddof", [2, 3, 4])
def test_var_and_std_with_ddof_at_or_above_the_count_match_torch(ddof, values):
    """inf, or nan for equal values, never negative and never an exception. (The gradient of an
    infinite variance is no number to compare: PyTorch's is inf for every element.)"""
    torch = pytest.importorskip("torch")
    x, xt = leaf(values), torch.tensor(values, dtype=torch.float64, requires_grad=True)
    for ours, theirs in [(x.var(ddof=ddof), xt.var(correction=ddof)), (x.std(ddof=ddof), xt.std(correction=ddof)),
                         (x.var(axis=0, ddof=ddof), xt.var(0, correction=ddof))]:
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-12)
        assert not ours.numpy() < 0


@pytest.mark.parametrize("axis", [None, 1])
def test_std_of_equal_values_has_gradient_zero_as_in_torch(axis):
    torch = pytest.importorskip("torch")
    values = [[3.0, 3.0, 3.0], [1.0, 2.0, 4.0]]
    x, xt = leaf(values), torch.tensor(values, dtype=torch.float64, requires_grad=True)
    x[:1].std(axis=axis).sum().backward()
    xt[:1].std(dim=axis, correction=0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), xt.grad.numpy())
    assert ta.gradgradcheck(lambda x: x.std(axis=1) * x[:, :1], [leaf([[0.5, -1.0, 2.0], [1.0, 2.0, 4.0]])])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mean_var_std_over_an_empty_axis_match_torch():
    torch = pytest.importorskip("torch")
    x, xt = leaf(np.zeros((0, 3))), torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    for ours, theirs in [(x.mean(axis=0), xt.mean(0)), (x.mean(), xt.mean()), (x.var(axis=0), xt.var(0, correction=0)),
                         (x.std(axis=0, ddof=1), xt.std(0, correction=1)), (x.mean(axis=1), xt.mean(1))]:
        assert ours.shape == tuple(theirs.shape)
        np.testing.assert_array_equal(ours.numpy(), theirs.detach().numpy())
    x.mean(axis=0).sum().backward()
    assert x.grad.shape == (0, 3)


# --- 4. max/min over a non-empty axis of an empty tensor; reductions of 0-d tensors --------

@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_of_an_empty_tensor_over_a_non_empty_axis(name):
    x = leaf(np.zeros((0, 3)))
    result = getattr(x, name)(axis=1)
    assert result.shape == (0,)
    assert getattr(x, name)(axis=1, keepdims=True).shape == (0, 1)
    result.sum().backward()
    assert x.grad.shape == (0, 3)
    with pytest.raises(ValueError, match=rf"{name}\(\) over an axis of size 0 \(shape \(0, 3\)\)"):
        getattr(x, name)(axis=0)


REDUCE_0D = {
    "sum": (lambda x, a: x.sum(axis=a), lambda t, d: t.sum(d)),
    "mean": (lambda x, a: x.mean(axis=a), lambda t, d: t.mean(d)),
    "max": (lambda x, a: x.max(axis=a), lambda t, d: t.amax(d)),
    "min": (lambda x, a: x.min(axis=a), lambda t, d: t.amin(d)),
    "var": (lambda x, a: x.var(axis=a), lambda t, d: t.var(d, correction=0)),
    "std_keepdims": (lambda x, a: x.std(axis=a, keepdims=True), lambda t, d: t.std(d, correction=0, keepdim=True)),
    "argmax": (lambda x, a: ta.argmax(x, axis=a), lambda t, d: t.argmax(d)),
    "argmin": (lambda x, a: x.argmin(axis=a), lambda t, d: t.argmin(d)),
}


@pytest.mark.parametrize("axis", [0, -1, (0,)], ids=str)
@pytest.mark.parametrize("name", REDUCE_0D)
def test_reductions_of_a_0d_tensor_along_axis_0_or_minus_1(name, axis):
    torch = pytest.importorskip("torch")
    ours, theirs = REDUCE_0D[name]
    if isinstance(axis, tuple) and name.startswith("arg"):
        pytest.skip("argmax and argmin take one axis, as in PyTorch")
    x, xt = leaf(2.5), torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    result, expected = ours(x, axis), theirs(xt, axis)
    assert result.shape == tuple(expected.shape) == ()
    np.testing.assert_array_equal(result.numpy(), expected.detach().numpy())
    if expected.requires_grad:
        result.backward()
        expected.backward()
        np.testing.assert_array_equal(x.grad.numpy(), xt.grad.numpy())
    with pytest.raises(ValueError, match=r"axis 1 is out of range for a tensor with 0 dimensions \(expected an int in \[-1, 0\]\)"):
        ours(x, 1)


def test_axis_empty_tuple_reduces_nothing():
    """NumPy's convention, kept on purpose (PyTorch's dim=() reduces everything)."""
    x = leaf([[1.0, -2.0], [3.0, 4.0]])
    for name in ("sum", "mean", "max", "min"):
        np.testing.assert_array_equal(getattr(x, name)(axis=()).numpy(), x.numpy())


# --- 5. clear errors -------------------------------------------------------------------------

def _ones(*shape):
    return ta.ones(*shape, dtype=ta.float64)


ERRORS = {
    "transpose_of_0d": (lambda: ta.tensor(2.0).transpose(0), ValueError, r"transpose axes \(0,\) are not a permutation of the 0 axes"),
    "len_of_0d": (lambda: len(ta.tensor(2.0)), TypeError, r"^len\(\) of a 0-d tensor$"),
    "iter_over_0d": (lambda: list(ta.tensor(2.0)), TypeError, r"iteration over a 0-d tensor"),
    "swapaxes_out_of_range": (lambda: _ones(2, 3).swapaxes(0, 5), ValueError,
                              r"axis2 5 is out of range for a tensor with 2 dimensions \(expected an int in \[-2, 1\]\)"),
    "transpose_out_of_range": (lambda: _ones(2, 3).transpose(0, 5), ValueError, "transpose axis 5 is out of range"),
    "sum_axis_float": (lambda: _ones(2, 3).sum(axis=1.0), TypeError, "axis must be an int, got float"),
    "mean_axis_twice": (lambda: _ones(2, 3).mean(axis=(1, -1)), ValueError, r"axis \(1, -1\) names an axis twice"),
    "var_axis_out_of_range": (lambda: _ones(2, 3).var(axis=-3), ValueError, "axis -3 is out of range"),
    "argmax_axis_tuple": (lambda: _ones(2, 3).argmax(axis=(0, 1)), TypeError, "axis must be an int, got tuple"),
    "argmin_out_of_range": (lambda: _ones(2, 3).argmin(axis=2), ValueError, "axis 2 is out of range"),
    "squeeze_out_of_range": (lambda: _ones(2, 1).squeeze(2), ValueError, "axis 2 is out of range"),
    "unsqueeze_float": (lambda: _ones(2).unsqueeze(0.5), TypeError, "unsqueeze axis must be an int, got float"),
    "expand_fewer_dims": (lambda: _ones(2, 3).expand(3), ValueError, r"expand: shape \(3,\) has fewer dimensions"),
    "expand_new_minus_one": (lambda: _ones(3).expand(-1, 3), ValueError, "-1 for a new leading dimension"),
    "concatenate_arrays": (lambda: ta.concatenate([_ones(2), np.ones(2)]), TypeError,
                           "concatenate.. needs a sequence of tensors, got ndarray at position 1"),
    "concatenate_0d": (lambda: ta.concatenate([ta.tensor(1.0), ta.tensor(2.0)]), ValueError, "at least one dimension"),
    "concatenate_axis": (lambda: ta.concatenate([_ones(2), _ones(2)], axis=1), ValueError, "axis 1 is out of range"),
    "stack_list": (lambda: ta.stack([_ones(2), [1.0, 2.0]]), TypeError, "stack.. needs a sequence of tensors, got list at position 1"),
    "split_0d": (lambda: ta.split(ta.tensor(1.0), 1), ValueError, "split.. needs a tensor with at least one dimension"),
    "maximum_two_numbers": (lambda: ta.maximum(1.0, 2.0), TypeError, r"maximum\(\) needs a tensor operand, got float and float"),
    "matmul_two_lists": (lambda: ta.matmul([1.0], [1.0]), TypeError, r"matmul\(\) needs a tensor operand, got list and list"),
    "float_of_many": (lambda: float(_ones(2)), ValueError, r"float\(\) needs a tensor with one element, got shape \(2,\)"),
    "int_of_many": (lambda: int(_ones(2, 1)), ValueError, r"int\(\) needs a tensor with one element"),
    "index_float": (lambda: _ones(4)[ta.tensor(1.0):3], TypeError, "only an integer tensor of one element can be used as an index"),
    "index_many": (lambda: [0, 1, 2][ta.tensor([1, 2])], TypeError, "only an integer tensor of one element"),
    "exp_of_a_list": (lambda: ta.exp([1.0]), TypeError, r"^Exp's input 1 must be a tensor, not list; wrap it with ta.tensor"),
    "sum_of_an_array": (lambda: ta.sum(np.ones(2)), TypeError, "^Sum's input 1 must be a tensor, not ndarray"),
    "log_of_a_number": (lambda: ta.log(2.0), TypeError, "^Log's input 1 must be a tensor, not float"),
    "mean_of_a_list": (lambda: ta.mean([1.0, 2.0]), TypeError, "^mean's input must be a tensor, not list"),
    "std_of_an_array": (lambda: ta.std(np.ones(2)), TypeError, "^var's input must be a tensor, not ndarray"),
    "argmax_of_an_array": (lambda: ta.argmax(np.ones(2)), TypeError, "^argmax's input must be a tensor, not ndarray"),
    "zeros_like_a_list": (lambda: ta.zeros_like([1.0]), TypeError, "^zeros_like's input must be a tensor, not list"),
    "layer_norm_of_an_array": (lambda: F.layer_norm(np.ones((2, 3))), TypeError, "^layer_norm's input must be a tensor, not ndarray"),
    "layer_norm_weight_list": (lambda: F.layer_norm(_ones(2, 3), [1.0] * 3), TypeError, "^layer_norm's weight must be a tensor, not list"),
    "device_an_array": (lambda: ta.set_default_device(np.ones(2)), ta.DeviceError, r"unknown device array\(\[1., 1.\]\)"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_mistakes_get_one_clear_error(name):
    make, error, message = ERRORS[name]
    with pytest.raises(error, match=message):
        make()


def test_0d_tensors_swap_and_transpose_as_in_torch():
    x = leaf(2.0)
    for y in (x.swapaxes(0, -1), x.transpose(), x.T, x.squeeze(0)):
        assert y.shape == () and y.item() == 2.0


def test_numpy_integers_and_integer_tensors_are_axes():
    x = leaf([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_array_equal(x.sum(axis=np.int64(1)).numpy(), [3.0, 8.0])
    np.testing.assert_array_equal(x.max(axis=ta.tensor(0)).numpy(), [3.0, 5.0])


# --- 6. one-element tensors as Python numbers; std -------------------------------------------

def test_float_int_index_of_one_element_tensors():
    torch = pytest.importorskip("torch")
    for values in (2.7, [2.7], [[-2.7]]):
        assert float(leaf(values)) == float(torch.tensor(values, dtype=torch.float64))
        assert int(leaf(values)) == int(torch.tensor(values, dtype=torch.float64))
    x = ta.arange(6)
    np.testing.assert_array_equal(x[ta.tensor(1):ta.tensor([4])].numpy(), [1, 2, 3])
    assert [10, 11, 12][ta.tensor(2)] == 12 and list(range(ta.tensor(3))) == [0, 1, 2]
    assert (ta.tensor(True).__index__(), torch.tensor(True).__index__()) == (1, 1)
    assert isinstance(float(ta.tensor(3)), float) and isinstance(int(ta.tensor(3.5)), int)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1)], ids=str)
@pytest.mark.parametrize("ddof", [0, 1])
def test_std_matches_torch(ddof, axis, keepdims):
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).standard_normal((3, 4))
    x = leaf(values)
    result = x.std(axis=axis, keepdims=keepdims, ddof=ddof)
    xt = torch.tensor(values, requires_grad=True)
    expected = xt.std(dim=axis, keepdim=keepdims, correction=ddof)
    np.testing.assert_allclose(result.numpy(), expected.detach().numpy(), rtol=1e-12)
    result.sum().backward()
    expected.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-10)
    assert ta.gradgradcheck(lambda x: x.std(axis=axis, ddof=ddof), [leaf(values)])


def test_std_is_a_top_level_function_as_var_is():
    x = ta.tensor([1.0, 3.0], dtype=ta.float64)
    assert ta.std(x).item() == x.std().item() == 1.0
