"""The gradient check itself: it passes on correct rules and fails, with a clear message, on wrong ones."""
import numpy as np
import pytest

import tinyattn as ta
from tinyattn.ops import Exp

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


class WrongExp(Exp):
    """exp with a deliberately wrong backward: off by a factor of 2."""

    def backward(self, grad):
        return grad * self.output * 2.0


class NoisyExp(Exp):
    """A backward that differs between calls: a rule must be deterministic."""

    calls = 0

    def backward(self, grad):
        NoisyExp.calls += 1
        return grad * self.output * (1.0 + 1e-3 * NoisyExp.calls)


class LeakyZeroExp(Exp):
    """A backward that returns gradient even when the output gradient is zero."""

    def backward(self, grad):
        return grad * self.output + 1.0


def inputs(*shape, seed=0):
    """One float64 input on the default device, which the device fixture sets."""
    return [ta.tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True, device=ta.get_default_device())]


def test_correct_rule_passes_dense_and_fast():
    assert ta.gradcheck(lambda x: Exp.apply(x), inputs(2, 3))
    assert ta.gradcheck(lambda x: Exp.apply(x), inputs(2, 3), fast=True)


def test_wrong_backward_fails_naming_input_element_and_values():
    with pytest.raises(ta.GradcheckError, match=r"input 0 \(shape \(2, 3\)\) at element \(0, 0\).*analytical .*numerical"):
        ta.gradcheck(lambda x: WrongExp.apply(x), inputs(2, 3))


def test_wrong_backward_fails_in_fast_mode():
    with pytest.raises(ta.GradcheckError, match="input 0.*random direction"):
        ta.gradcheck(lambda x: WrongExp.apply(x), inputs(4, 5), fast=True)


def test_wrong_backward_fails_gradgradcheck():
    with pytest.raises(ta.GradcheckError):
        ta.gradgradcheck(lambda x: WrongExp.apply(x) * 1.0, inputs(3))


def test_non_repeatable_backward_is_caught():
    with pytest.raises(ta.GradcheckError, match="not repeatable"):
        ta.gradcheck(lambda x: NoisyExp.apply(x), inputs(3))


def test_nonzero_gradient_from_zero_output_gradient_is_caught():
    with pytest.raises(ta.GradcheckError, match="zero output gradient"):
        ta.gradcheck(lambda x: LeakyZeroExp.apply(x), inputs(3))


def test_float32_inputs_are_refused():
    with pytest.raises(ValueError, match="float64.*float32"):
        ta.gradcheck(lambda x: x.exp(), [ta.tensor([1.0], requires_grad=True)])


def test_inputs_are_restored_after_the_check():
    x = inputs(2, 2)[0]
    before = x.numpy().copy()
    ta.gradcheck(lambda x: x.tanh(), [x])
    ta.gradcheck(lambda x: x.tanh(), [x], fast=True)
    np.testing.assert_array_equal(x.numpy(), before)
    assert x.grad is None


def test_multiple_outputs_and_non_differentiable_inputs():
    x = inputs(2, 3)[0]
    mask = ta.tensor([[True, False, True], [False, True, True]])
    assert ta.gradcheck(lambda x, m: (x.masked_fill(m, 0.0), x.sum(axis=0)), [x, mask])
