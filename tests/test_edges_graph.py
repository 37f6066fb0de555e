"""Issue 14, the graph's edges: grad() walks only the paths to its inputs and hands out arrays of
their own, clear errors for wrong arguments, tensor and module hooks, item assignment with version
checks, and grad modes on generators and as a plain call. Against PyTorch where it is installed."""
import numpy as np
import pytest

import tinyattn as ta
from tinyattn import kernels, nn
from tinyattn.kernels.cross_entropy import cross_entropy

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


def leaf(values, requires_grad=True):
    """A float64 leaf on the default device, which the device fixture sets."""
    return ta.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad, device=ta.get_default_device())


def twin(torch, tensor, requires_grad=True):
    """The PyTorch tensor of the same values."""
    return torch.tensor(tensor.numpy(), dtype=torch.float64, requires_grad=requires_grad)


def assert_own_writable(*grads):
    """Each gradient's array is writable and shared with none of the others."""
    for g in grads:
        assert getattr(g.data.flags, "writeable", True)  # CuPy's flags have no writeable; its arrays always are
        assert g.data.base is None
    for i, g in enumerate(grads):
        before = [other.numpy().copy() for other in grads]
        g.data[...] = -7.0
        for j, other in enumerate(grads):
            if j != i:
                np.testing.assert_array_equal(other.numpy(), before[j])


# --- 1. grad() walks only the paths from outputs to inputs; results of their own -------------------

def test_grad_with_create_graph_ignores_an_unrelated_fused_branch():
    torch = pytest.importorskip("torch")
    x = leaf([0.5, -1.0, 2.0])
    logits = leaf(np.linspace(-1.0, 1.0, 6).reshape(2, 3))
    targets = ta.tensor([0, 2], device=ta.get_default_device())
    with kernels.use("fused"):  # the fused cross-entropy's backward refuses create_graph
        loss = (x ** 3).sum() + cross_entropy(logits, targets)
    (dx,) = ta.grad(loss, [x], create_graph=True)
    (d2x,) = ta.grad(dx.sum(), [x])
    tx = twin(torch, x)
    (tdx,) = torch.autograd.grad((tx ** 3).sum(), [tx], create_graph=True)
    (td2x,) = torch.autograd.grad(tdx.sum(), [tx])
    np.testing.assert_allclose(dx.numpy(), tdx.detach().numpy())
    np.testing.assert_allclose(d2x.numpy(), td2x.numpy())


def test_grad_runs_no_backward_off_the_paths_to_its_inputs(function_calls):
    a, b, c = leaf([1.0, 2.0]), leaf([3.0, 4.0]), leaf([0.5, 0.25])
    loss = (a * b).sum() + c.exp().sum()
    calls = function_calls(lambda: ta.grad(loss, a, retain_graph=True))
    ran = [name for phase, name in calls if phase == "backward"]
    assert "Exp" not in ran and "Mul" in ran
    # the branch it skipped is intact, so a full backward afterwards still works
    loss.backward()
    np.testing.assert_allclose(c.grad.numpy(), np.exp([0.5, 0.25]))


def test_grad_of_a_non_leaf_input_runs_nothing_below_it(function_calls):
    x = leaf([1.0, 2.0])
    h = x.exp()
    loss = (h * h).sum()
    calls = function_calls(lambda: np.testing.assert_allclose(ta.grad(loss, h).numpy(), 2 * np.exp([1.0, 2.0])))
    assert ("backward", "Exp") not in calls


def test_grad_results_are_writable_arrays_of_their_own():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    assert_own_writable(ta.grad((a + b).sum(), a))  # Sum's backward broadcasts: a read-only view
    assert_own_writable(*ta.grad((a + b).sum(), [a, b]))  # Add hands the same gradient to both
    assert_own_writable(*ta.grad((a + b).sum(), [a, b], create_graph=True))
    y = a * 1.0
    upstream = leaf([5.0, 6.0], requires_grad=False)
    assert_own_writable(ta.grad(y + 0.0, y, grad_outputs=upstream), upstream)
    (a.sum() * b.sum()).backward(create_graph=True)  # each gradient a broadcast view, with a graph
    assert a.grad.requires_grad and b.grad.requires_grad
    assert_own_writable(a.grad, b.grad)
    (c,) = ta.grad((a.sum() * b.sum()), [a], create_graph=True)
    assert c.requires_grad
    assert_own_writable(c)


def test_grad_with_create_graph_keeps_its_copies_differentiable():
    torch = pytest.importorskip("torch")
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    ga, gb = ta.grad((a * a + b).sum(), [a, b], create_graph=True)
    (a2,) = ta.grad((ga * gb).sum(), [a])
    ta_, tb = twin(torch, a), twin(torch, b)
    tga, tgb = torch.autograd.grad((ta_ * ta_ + tb).sum(), [ta_, tb], create_graph=True)
    (ta2,) = torch.autograd.grad((tga * tgb).sum(), [ta_])
    np.testing.assert_allclose(a2.numpy(), ta2.numpy())


# --- 2. wrong arguments to grad() -------------------------------------------------------------------

def test_grad_names_a_wrong_argument():
    x = leaf([1.0, 2.0])
    loss = (x * x).sum()
    with pytest.raises(TypeError, match=r"^grad\(\): inputs\[0\] must be a Tensor, got float$"):
        ta.grad(loss, [1.0])
    with pytest.raises(TypeError, match=r"^grad\(\): inputs must be a Tensor or a sequence of Tensors, got str$"):
        ta.grad(loss, "x")
    with pytest.raises(TypeError, match=r"^grad\(\): outputs must be a Tensor, got list"):
        ta.grad([loss], x)
    with pytest.raises(ValueError, match=r"^grad\(\): inputs is empty"):
        ta.grad(loss, [])
    with pytest.raises(RuntimeError, match=r"^grad\(\): inputs\[1\] does not require grad"):
        ta.grad(loss, [x, leaf([1.0], requires_grad=False)])
    with pytest.raises(TypeError, match=r"^grad\(\): grad_outputs must be a Tensor or an array, got str$"):
        ta.grad(x * 2.0, x, grad_outputs="ones")


# --- 3. hooks -------------------------------------------------------------------------------------

def test_tensor_hooks_see_and_replace_gradients_as_in_pytorch():
    torch = pytest.importorskip("torch")

    def run(lib, x, w):
        seen = []
        values = (lambda g: g.numpy().copy()) if lib is ta else (lambda g: g.detach().numpy().copy())
        h = x * w
        h.register_hook(lambda g: seen.append(("h", values(g))))
        h.register_hook(lambda g: g * 2.0)  # replaces the gradient of h, hooks run in order
        handle = w.register_hook(lambda g: g + 1.0)
        x.register_hook(lambda g: seen.append(("x", values(g))))
        (h.sum() + (x * x).sum()).backward()  # x is used twice: its hook sees the sum, once
        handle.remove()
        (x * w).sum().backward()
        return seen, x.grad, w.grad

    x, w = leaf([1.0, 2.0]), leaf([3.0, -1.0])
    seen, x_grad, w_grad = run(ta, x, w)
    tseen, tx_grad, tw_grad = run(torch, twin(torch, x), twin(torch, w))
    assert [name for name, _ in seen] == [name for name, _ in tseen] == ["h", "x", "x"]
    for (_, ours), (_, theirs) in zip(seen, tseen):
        np.testing.assert_allclose(ours, theirs)
    np.testing.assert_allclose(x_grad.numpy(), tx_grad.numpy())
    np.testing.assert_allclose(w_grad.numpy(), tw_grad.numpy())


def test_tensor_hooks_run_for_grad_and_under_create_graph():
    torch = pytest.importorskip("torch")
    x = leaf([1.0, 2.0])
    y = x * x
    y.register_hook(lambda g: g * y)  # the replacement is itself differentiated
    (dx,) = ta.grad(y.sum(), [x], create_graph=True)
    (d2x,) = ta.grad(dx.sum(), [x])
    tx = twin(torch, x)
    ty = tx * tx
    ty.register_hook(lambda g: g * ty)
    (tdx,) = torch.autograd.grad(ty.sum(), [tx], create_graph=True)
    (td2x,) = torch.autograd.grad(tdx.sum(), [tx])
    np.testing.assert_allclose(dx.numpy(), tdx.detach().numpy())
    np.testing.assert_allclose(d2x.numpy(), td2x.numpy())


def test_tensor_hook_errors_are_clear():
    with pytest.raises(RuntimeError, match="does not require grad"):
        leaf([1.0], requires_grad=False).register_hook(lambda g: g)
    with pytest.raises(TypeError, match="callable"):
        leaf([1.0]).register_hook(None)
    x = leaf([1.0, 2.0])
    x.register_hook(lambda g: g.sum())
    with pytest.raises(ValueError, match=r"hook returned a gradient of shape \(\) for a tensor of shape \(2,\)"):
        (x * 2.0).sum().backward()


def test_module_forward_hooks_change_inputs_and_outputs_until_removed():
    layer = nn.Linear(2, 3, generator=ta.Generator(0))
    layer.to(ta.get_default_device())
    x = ta.tensor([[1.0, 2.0]], device=ta.get_default_device())
    plain = layer(x).numpy()
    calls = []
    pre = layer.register_forward_pre_hook(lambda module, args: calls.append("pre") or (args[0] * 2.0,))
    post = layer.register_forward_hook(lambda module, args, output: calls.append(("post", args[0].shape)) or output + 1.0)
    np.testing.assert_allclose(layer(x).numpy(), layer.forward(x * 2.0).numpy() + 1.0)
    assert calls == ["pre", ("post", (1, 2))]
    pre.remove()
    post.remove()
    np.testing.assert_array_equal(layer(x).numpy(), plain)
    assert calls == ["pre", ("post", (1, 2))]


def test_a_module_without_hooks_calls_forward_directly():
    assert not nn.Linear(2, 3)._forward_hooks  # the one test __call__ makes when none is registered


# --- 4. item assignment and in-place changes --------------------------------------------------------

INDICES = [
    (1, [9.0, 8.0, 7.0]),
    ((slice(0, 2), 1), [5.0, 6.0]),
    ((slice(None), [0, 2]), 2.5),  # a scalar value broadcasts
    (([0, 1], [2, 0]), [1.0, -1.0]),
    ((slice(1, None),), [[3.0, 4.0, 5.0]]),  # value (1, 3) broadcast over rows 1 and 2
]


@pytest.mark.parametrize("index, value", INDICES)
def test_item_assignment_is_recorded_as_in_pytorch(index, value):
    torch = pytest.importorskip("torch")
    base = np.arange(9.0).reshape(3, 3) / 4
    weights = np.linspace(1.0, 2.0, 9).reshape(3, 3)

    def run(lib, make):
        x = make(base)
        v = make(np.asarray(value, dtype=np.float64))
        y = x * 1.5
        y[index] = v * 2.0
        (y * y * make(weights, False)).sum().backward()
        return y, x.grad, v.grad

    ours = run(ta, lambda a, grad=True: leaf(a, requires_grad=grad))
    theirs = run(torch, lambda a, grad=True: torch.tensor(a, dtype=torch.float64, requires_grad=grad))
    assert ours[0].grad_fn is not None
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine.numpy(), reference.detach().numpy())


def test_item_assignment_into_a_plain_tensor_records_the_value():
    torch = pytest.importorskip("torch")
    v = leaf([2.0, 3.0])
    buffer = ta.zeros(4, dtype=ta.float64)
    buffer[1:3] = v * v
    assert buffer.requires_grad and not buffer.is_leaf
    (buffer * ta.tensor([1.0, 2.0, 3.0, 4.0], dtype=ta.float64)).sum().backward()
    tv = twin(torch, v)
    tbuffer = torch.zeros(4, dtype=torch.float64)
    tbuffer[1:3] = tv * tv
    (tbuffer * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(buffer.numpy(), tbuffer.detach().numpy())
    np.testing.assert_allclose(v.grad.numpy(), tv.grad.numpy())


def test_item_assignment_is_differentiable_twice():
    def f(x, v):
        y = x * 1.0
        y[0] = v * v
        return (y * y).sum(axis=0)

    assert ta.gradcheck(f, [leaf(np.ones((2, 3)) / 3), leaf([0.5, -1.0, 2.0])])
    assert ta.gradgradcheck(f, [leaf(np.ones((2, 3)) / 3), leaf([0.5, -1.0, 2.0])])


def test_item_assignment_to_a_leaf_that_requires_grad_only_under_no_grad():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        x[0] = 5.0
    with ta.no_grad():
        x[0] = 5.0  # as an optimizer's update would
    assert x.requires_grad and x.is_leaf
    np.testing.assert_array_equal(x.numpy(), [5.0, 2.0])


def test_an_in_place_change_to_a_saved_input_makes_backward_raise():
    torch = pytest.importorskip("torch")
    w = leaf([1.0, 2.0])
    x = leaf([3.0, 4.0], requires_grad=False)
    y = (w * x).sum()
    x[0] = 10.0
    with pytest.raises(RuntimeError, match=r"^a tensor needed for the gradient of Mul was changed in place after it was used"):
        y.backward()
    tw, tx = twin(torch, w), twin(torch, x, requires_grad=False)
    ty = (tw * tx).sum()
    tx[0] = 10.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ty.backward()


def test_a_recorded_assignment_leaves_the_ops_before_it_their_values():
    """Recorded, an assignment writes into a copy, so the ops that used the tensor before still
    differentiate what they saw, where PyTorch would refuse the first two; the reference here
    makes those copies by hand (clone)."""
    torch = pytest.importorskip("torch")

    def run(lib, x, w, clone):
        e = clone(x.exp())  # Exp's backward reads its output
        e[0] = 0.0
        y = x * w
        r = w * 1.0
        z = clone(r) * x  # Mul's reads its inputs
        r[1] = y[0] * 3.0
        h = x * 1.0
        h[0] = h[1] * 2.0  # reads the tensor it changes
        (e.sum() + (y * y).sum() + (z * r).sum() + (h * h).sum()).backward()
        return e, r, h, x.grad, w.grad

    x, w = leaf([1.0, 2.0]), leaf([3.0, -1.0])
    ours = run(ta, x, w, lambda t: t)
    theirs = run(torch, twin(torch, x), twin(torch, w), lambda t: t.clone())
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine.numpy(), reference.detach().numpy())


def test_plus_equals_makes_a_new_tensor_so_saved_tensors_keep_their_values():
    w, x = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    kept = x
    y = (w * x).sum()
    x += 1.0  # Tensor has no __iadd__: Python computes x + 1.0 and rebinds the name
    assert x is not kept
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [3.0, 4.0])


def test_editing_data_by_hand_stays_unchecked():
    w, x = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    y = (w * x).sum()
    x.data[0] = 10.0  # the documented escape hatch: the gradient uses the new values
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [10.0, 4.0])


def layer_norm_then_assign(path, recorded):
    """A layer norm's output, read by an op, then changed by item assignment (recorded or under
    no_grad), then read again; on the fused path the output is a deferred kernel result."""
    x = leaf(np.arange(6.0).reshape(2, 3) ** 2)
    with kernels.use(path):
        y = ta.functional.layer_norm(x)
        before = (y * y).sum()
        if recorded:
            y[0, 1] = x[1, 2] * 3
        else:
            with ta.no_grad():
                y[0] = 0.0
        return x, y, before + (y * leaf([1.0, 2.0, 3.0], requires_grad=False)).sum()


def test_item_assignment_into_a_deferred_kernel_result_is_recorded_as_into_any_tensor():
    x_fused, y_fused, loss_fused = layer_norm_then_assign("fused", recorded=True)
    x_composed, y_composed, loss_composed = layer_norm_then_assign("composed", recorded=True)
    np.testing.assert_allclose(y_fused.numpy(), y_composed.numpy(), rtol=1e-12)
    assert y_fused.numpy()[0, 1] == 75.0
    loss_fused.backward()
    loss_composed.backward()
    np.testing.assert_allclose(x_fused.grad.numpy(), x_composed.grad.numpy(), rtol=1e-10)
    _, _, unrecorded = layer_norm_then_assign("fused", recorded=False)
    with pytest.raises(RuntimeError, match="was changed in place after it was used"):
        unrecorded.backward()


def test_item_assignment_errors_name_the_shapes():
    x = leaf(np.zeros((2, 3)), requires_grad=False)
    with pytest.raises(ValueError, match=r"SetItem on shapes \(2, 3\) and \(4,\)"):
        x[0] = leaf(np.ones(4))


# --- 5. grad modes on generators and as a plain call -------------------------------------------------

def test_grad_mode_decorators_hold_inside_a_generator_across_yields():
    torch = pytest.importorskip("torch")
    x = leaf([1.0])

    def run(lib, x):
        @lib.no_grad()
        def frozen():
            for _ in range(2):
                yield (x * 2.0).requires_grad, lib.is_grad_enabled()

        @lib.enable_grad()
        def recording():
            yield (x * 2.0).requires_grad

        @lib.set_grad_enabled(False)
        def off():
            yield lib.is_grad_enabled()

        seen = []
        for item in frozen():
            seen.append((item, lib.is_grad_enabled()))  # the caller's mode between yields
        with lib.no_grad():
            seen.append(list(recording()))
        seen.append((list(off()), lib.is_grad_enabled()))
        return seen

    assert run(ta, x) == run(torch, twin(torch, x)) == [
        ((False, False), True), ((False, False), True), [True], ([False], True)]


def test_set_grad_enabled_called_on_its_own_switches_the_mode():
    torch = pytest.importorskip("torch")
    for lib in (ta, torch):
        try:
            lib.set_grad_enabled(False)
            assert not lib.is_grad_enabled()
            with lib.set_grad_enabled(True):
                assert lib.is_grad_enabled()
            assert not lib.is_grad_enabled()
        finally:
            lib.set_grad_enabled(True)
        assert lib.is_grad_enabled()
