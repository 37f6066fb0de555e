"""The backward walk: accumulation, retain_grad, released graphs, create_graph, grad modes."""
import gc
import threading
import weakref

import numpy as np
import pytest

import tinyattn as ta

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


def leaf(values, dtype=ta.float64):
    """A leaf on the default device, which the device fixture sets."""
    return ta.tensor(np.asarray(values, dtype=dtype), requires_grad=True, device=ta.get_default_device())


def test_gradient_of_a_product_is_the_other_factor():
    a, b = leaf([1.0, 2.0]), leaf([3.0, -4.0])
    (a * b).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [3.0, -4.0])
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 2.0])


def test_an_input_used_twice_gets_both_contributions():
    x = leaf([3.0])
    (x * x + x).sum().backward()  # d/dx (x^2 + x) = 2x + 1
    np.testing.assert_array_equal(x.grad.numpy(), [7.0])


def test_diamond_graph_sums_both_paths():
    x = leaf([2.0])
    shared = x.exp()
    (shared * 3.0 + shared * shared).sum().backward()  # 3e^x + 2e^{2x}
    np.testing.assert_allclose(x.grad.numpy(), [3 * np.exp(2.0) + 2 * np.exp(4.0)])


def test_gradients_accumulate_across_backward_calls_until_cleared():
    x = leaf([1.0, 2.0])
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 5.0])


def test_broadcast_operand_gets_gradient_of_its_own_shape():
    matrix, row = leaf(np.ones((3, 4))), leaf(np.arange(4.0))
    (matrix * row).sum().backward()
    assert row.grad.shape == (4,)
    np.testing.assert_array_equal(row.grad.numpy(), [3.0] * 4)
    np.testing.assert_array_equal(matrix.grad.numpy(), np.tile(np.arange(4.0), (3, 1)))


def test_non_leaf_grad_is_kept_only_on_retain_grad():
    x = leaf([1.0, 2.0])
    kept, dropped = x * 2.0, x * 3.0
    kept.retain_grad()
    (kept * dropped).sum().backward()
    np.testing.assert_array_equal(kept.grad.numpy(), [3.0, 6.0])
    assert dropped.grad is None


def test_explicit_grad_for_a_non_scalar_output():
    x = leaf([1.0, 2.0, 3.0])
    (x * x).backward(grad=np.array([1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 0.0, 12.0])


def test_backward_of_non_scalar_without_grad_says_so():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"one element.*\(2,\).*grad="):
        (x * 2.0).backward()


def test_backward_with_a_grad_of_the_wrong_shape_names_both_shapes():
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        (x * 2.0).backward(grad=np.ones(3))


def test_backward_with_a_grad_on_another_device_names_both(device):
    if device == "cpu":
        pytest.skip("a grad on another device needs the cuda device")
    with pytest.raises(ta.DeviceError, match="grad on cpu for a tensor on cuda"):
        (leaf([1.0, 2.0]) * 2.0).backward(grad=ta.ones(2, dtype=ta.float64, device="cpu"))


def test_backward_on_a_tensor_without_grad_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        ta.tensor([1.0]).sum().backward()


def test_second_backward_through_a_released_graph_is_a_clear_error():
    x = leaf([1.0, 2.0])
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already released.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    y = (x.exp() * 2.0).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 4 * np.exp([1.0, 2.0]))


def test_forward_and_backward_read_nothing_back_from_the_device(sync_counter):
    x, w = leaf(np.ones((2, 3))), leaf(np.full((3, 4), 0.5))
    loss = ((x @ w).tanh() * 2.0).sum()
    loss.backward()
    assert sync_counter.count == 0
    loss.item()
    assert sync_counter.count == 1


def test_backward_releases_saved_arrays():
    x = leaf(np.ones(4))
    hidden = x.exp()
    y = (hidden * 2.0).sum()
    creator = hidden.grad_fn
    assert creator.inputs is not None
    y.backward()
    assert creator.inputs is None and vars(creator) == {}


def test_hundred_thousand_op_chain_backpropagates_without_recursion():
    x = leaf([1.0])
    y = x
    for _ in range(100_000):
        y = y + 1e-6
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0])


def test_create_graph_gives_second_and_third_derivatives():
    x = leaf([2.0])
    y = (x ** 3).sum()
    (dy,) = [ta.grad(y, x, create_graph=True)]
    (d2y,) = [ta.grad(dy.sum(), x, create_graph=True)]
    d3y = ta.grad(d2y.sum(), x)
    np.testing.assert_allclose(dy.numpy(), [12.0])  # 3x^2
    np.testing.assert_allclose(d2y.numpy(), [12.0])  # 6x
    np.testing.assert_allclose(d3y.numpy(), [6.0])


def test_backward_with_create_graph_makes_leaf_grad_differentiable():
    x = leaf([1.5])
    (x.tanh() * x).sum().backward(create_graph=True)
    first = x.grad
    assert first.requires_grad
    x.grad = None
    first.sum().backward()
    t = np.tanh(1.5)
    # d/dx [tanh x + x (1 - tanh^2 x)] = 2 (1 - t^2) - 2 x t (1 - t^2)
    np.testing.assert_allclose(x.grad.numpy(), [2 * (1 - t * t) - 2 * 1.5 * t * (1 - t * t)])


def test_grad_returns_gradients_without_touching_dot_grad():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    ga, gb = ta.grad((a * b).sum(), [a, b])
    np.testing.assert_array_equal(ga.numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(gb.numpy(), [1.0, 2.0])
    assert a.grad is None and b.grad is None


def test_grad_of_an_unused_input_is_an_error_unless_allowed():
    a, unused = leaf([1.0]), leaf([1.0])
    with pytest.raises(RuntimeError, match="input 1.*not used"):
        ta.grad((a * 2.0).sum(), [a, unused], retain_graph=True)
    assert ta.grad((a * 2.0).sum(), [a, unused], allow_unused=True)[1] is None


def test_no_grad_records_nothing_and_keeps_nothing_alive():
    x = leaf(np.ones(3))
    with ta.no_grad():
        y = x.exp()
    assert not y.requires_grad and y.grad_fn is None
    probe = leaf(np.ones(3))
    with ta.no_grad():
        out = probe * 2.0
    watcher = weakref.ref(probe)
    del probe
    gc.collect()
    assert watcher() is None and out.grad_fn is None


def test_no_grad_as_decorator_and_enable_grad_inside():
    x = leaf([1.0])

    @ta.no_grad()
    def frozen():
        inside = x * 2.0
        with ta.enable_grad():
            recorded = x * 2.0
        return inside, recorded

    inside, recorded = frozen()
    assert not inside.requires_grad and recorded.requires_grad
    assert ta.is_grad_enabled()


def test_no_grad_is_thread_local():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with ta.no_grad():
            entered.set()
            release.wait(5)
            seen["worker"] = ta.is_grad_enabled()

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(5)
    seen["main"] = ta.is_grad_enabled()
    release.set()
    thread.join()
    assert seen == {"main": True, "worker": False}


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with ta.no_grad():
            1 / 0
    assert ta.is_grad_enabled()


def test_detach_cuts_the_graph():
    x = leaf([2.0])
    y = (x * x).detach() * x
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [4.0])


def test_float32_leaves_get_float32_gradients_even_from_float64_upstream():
    x = ta.tensor([1.0, 2.0], requires_grad=True)
    (x.astype(ta.float64) * 3.0).sum().backward()
    assert x.grad.dtype == ta.float32
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])


def test_integer_results_never_require_grad():
    x = leaf([1.0, 5.0, 3.0])
    assert not x.argmax().requires_grad
    assert not (x > 2.0).requires_grad
    assert not x.astype(ta.int64).requires_grad


def test_set_grad_enabled_works_as_a_decorator():
    x = leaf([1.0])

    @ta.set_grad_enabled(False)
    def frozen():
        return x * 2.0

    assert not frozen().requires_grad


def test_leaf_gradients_are_separate_writable_arrays():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (a + b).sum().backward()  # both leaves receive the same broadcast gradient
    assert a.grad is not b.grad
    a.grad.data *= 0.5
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 1.0])
    upstream = leaf(np.ones(2)).detach()
    y = leaf([1.0, 2.0])
    (y + 0.0).backward(upstream)
    upstream.data[...] = 5.0
    np.testing.assert_array_equal(y.grad.numpy(), [1.0, 1.0])


# --- Functions with several outputs, optional inputs, and op hooks ---------------------------------

class _SumAndProduct(ta.Function):
    """Two outputs from one Function: (a + b, a * b), with an optional bias added to the sum."""

    def forward(self, a, b, bias):
        self.a, self.b = a, b
        total = a + b if bias is None else a + b + bias
        return total, a * b

    def backward(self, grad_total, grad_product):
        a, b = ta.Tensor(self.a), ta.Tensor(self.b)
        grad_a = grad_b = None
        if grad_total is not None:
            grad_a, grad_b = grad_total, grad_total
        if grad_product is not None:
            grad_a = grad_product * b if grad_a is None else grad_a + grad_product * b
            grad_b = grad_product * a if grad_b is None else grad_b + grad_product * a
        return grad_a, grad_b, grad_total


def test_a_function_with_two_outputs_gets_a_gradient_for_each():
    a = ta.tensor([1.0, 2.0], dtype=ta.float64, requires_grad=True)
    b = ta.tensor([3.0, 5.0], dtype=ta.float64, requires_grad=True)
    total, product = _SumAndProduct.apply(a, b, None)
    assert total.grad_fn is product.grad_fn
    (total.sum() * 2 + product.sum()).backward()
    np.testing.assert_allclose(a.grad.numpy(), 2 + b.numpy())
    np.testing.assert_allclose(b.grad.numpy(), 2 + a.numpy())


def test_an_output_no_gradient_reaches_is_handed_to_backward_as_none():
    a = ta.tensor([1.0, 2.0], dtype=ta.float64, requires_grad=True)
    b = ta.tensor([3.0, 5.0], dtype=ta.float64, requires_grad=True)
    _, product = _SumAndProduct.apply(a, b, None)
    product.sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), b.numpy())


def test_an_optional_input_may_be_none_or_a_tensor():
    a = ta.tensor([1.0, 2.0], dtype=ta.float64, requires_grad=True)
    b = ta.tensor([3.0, 5.0], dtype=ta.float64)
    bias = ta.tensor([0.5, 0.5], dtype=ta.float64, requires_grad=True)
    total, _ = _SumAndProduct.apply(a, b, bias)
    np.testing.assert_allclose(total.numpy(), [4.5, 7.5])
    total.sum().backward()
    np.testing.assert_allclose(bias.grad.numpy(), [1.0, 1.0])
    assert ta.gradcheck(lambda a, bias: _SumAndProduct.apply(a, b, bias)[1] + _SumAndProduct.apply(a, b, bias)[0],
                        [a.detach().requires_grad_(), bias.detach().requires_grad_()])


def test_op_hooks_see_every_forward_and_backward_until_removed():
    from tinyattn import engine
    seen = []

    def hook(phase, name, run):
        seen.append((phase, name))
        return run()

    x = ta.tensor([1.0, 2.0], requires_grad=True)
    handle = engine.add_op_hook(hook)
    (x * 3.0).sum().backward()
    handle.remove()
    assert seen[:2] == [("forward", "Mul"), ("forward", "Sum")]
    # backward rules run ops of their own (Sum's broadcasts its gradient), which hooks see too
    assert [entry for entry in seen if entry[0] == "backward"] == [("backward", "Sum"), ("backward", "Mul")]
    count = len(seen)
    (x * 3.0).sum()
    assert len(seen) == count  # removed: nothing more recorded
