"""softmax, log_softmax, cross_entropy, layer_norm and dropout against NumPy written out by hand."""
import numpy as np
import pytest

import tinyattn as ta
from tinyattn import functional as F

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


def rng_array(*shape, seed=0):
    return np.random.default_rng(2000 + seed).standard_normal(shape)


def device_tensor(data, requires_grad=False):
    """`data` as a tensor on the default device, which the device fixture sets."""
    return ta.tensor(data, requires_grad=requires_grad, device=ta.get_default_device())


def x64(*shape, seed=0, requires_grad=True):
    return device_tensor(rng_array(*shape, seed=seed), requires_grad=requires_grad)


def np_log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --- softmax and log_softmax -------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_matches_numpy(axis):
    x = rng_array(3, 4, 5) * 2
    out = F.softmax(device_tensor(x), axis=axis).numpy()
    expected = np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.sum(axis=axis), 1.0, rtol=1e-12)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax_matches_numpy(axis):
    x = rng_array(3, 4, 5) * 2
    out = F.log_softmax(device_tensor(x), axis=axis).numpy()
    expected = x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.exp(out).sum(axis=axis), 1.0, rtol=1e-12)


def test_softmax_default_axis_is_last():
    x = rng_array(3, 4)
    np.testing.assert_allclose(F.softmax(device_tensor(x)).numpy(), np_softmax(x, -1), rtol=1e-12)
    np.testing.assert_allclose(F.log_softmax(device_tensor(x)).numpy(), np_log_softmax(x, -1), rtol=1e-12)


def test_softmax_stable_at_large_logits_float32():
    base = np.array([[0.0, 1.0, -2.0, 0.5], [3.0, 3.0, 3.0, 3.0]])
    x = device_tensor((base + 1e4).astype(np.float32))
    assert x.dtype == ta.float32
    soft = F.softmax(x, axis=-1)
    log_soft = F.log_softmax(x, axis=-1)
    assert soft.dtype == ta.float32 and log_soft.dtype == ta.float32
    assert np.isfinite(soft.numpy()).all() and np.isfinite(log_soft.numpy()).all()
    np.testing.assert_allclose(soft.numpy(), np_softmax(base), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(log_soft.numpy(), np_log_softmax(base), rtol=1e-5, atol=1e-5)
    neg = device_tensor((base - 1e4).astype(np.float32))
    np.testing.assert_allclose(F.softmax(neg).numpy(), np_softmax(base), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(F.log_softmax(neg).numpy(), np_log_softmax(base), rtol=1e-5, atol=1e-5)


def test_softmax_gradient_values():
    x = x64(3, 4)
    g = rng_array(3, 4, seed=1)
    F.softmax(x, axis=-1).backward(g)
    y = np_softmax(x.numpy())
    expected = y * (g - (g * y).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_gradcheck(fn, axis):
    x = x64(3, 4)
    assert ta.gradcheck(lambda x: fn(x, axis=axis), [x])
    assert ta.gradgradcheck(lambda x: fn(x, axis=axis), [x])


# --- cross_entropy -----------------------------------------------------------------------

def test_cross_entropy_matches_numpy():
    logits = rng_array(5, 4) * 2
    targets = np.array([0, 3, 1, 1, 2])
    loss = F.cross_entropy(device_tensor(logits), device_tensor(targets))
    assert loss.shape == ()
    expected = -np_log_softmax(logits)[np.arange(5), targets].mean()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)


def test_cross_entropy_gradient_values():
    logits = x64(5, 4)
    targets = np.array([0, 3, 1, 1, 2])
    F.cross_entropy(logits, device_tensor(targets)).backward()
    expected = np_softmax(logits.numpy())
    expected[np.arange(5), targets] -= 1.0
    np.testing.assert_allclose(logits.grad.numpy(), expected / 5, rtol=1e-10, atol=1e-14)


def test_cross_entropy_reductions():
    logits = rng_array(5, 4)
    targets = np.array([0, 3, 1, 1, 2])
    per_row = -np_log_softmax(logits)[np.arange(5), targets]
    none = F.cross_entropy(device_tensor(logits), device_tensor(targets), reduction="none")
    assert none.shape == (5,)
    np.testing.assert_allclose(none.numpy(), per_row, rtol=1e-12)
    total = F.cross_entropy(device_tensor(logits), device_tensor(targets), reduction="sum")
    assert total.shape == ()
    np.testing.assert_allclose(total.item(), per_row.sum(), rtol=1e-12)


def test_cross_entropy_ignore_index():
    logits = x64(6, 4)
    targets = np.array([0, -100, 3, 2, -100, 1])
    loss = F.cross_entropy(logits, device_tensor(targets), ignore_index=-100)
    kept = targets != -100
    rows = np.arange(6)[kept]
    expected = -np_log_softmax(logits.numpy())[rows, targets[kept]].mean()  # mean over the 4 kept rows
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)
    loss.backward()
    grad = logits.grad.numpy()
    np.testing.assert_array_equal(grad[~kept], 0.0)
    expected_grad = np_softmax(logits.numpy()[kept])
    expected_grad[np.arange(4), targets[kept]] -= 1.0
    np.testing.assert_allclose(grad[kept], expected_grad / 4, rtol=1e-10, atol=1e-14)


def test_cross_entropy_ignore_index_other_reductions():
    logits = rng_array(4, 3)
    targets = np.array([2, 0, 2, 1])
    per_row = -np_log_softmax(logits)[np.arange(4), targets]
    none = F.cross_entropy(device_tensor(logits), device_tensor(targets), ignore_index=2, reduction="none").numpy()
    np.testing.assert_allclose(none, [0.0, per_row[1], 0.0, per_row[3]], rtol=1e-12)
    total = F.cross_entropy(device_tensor(logits), device_tensor(targets), ignore_index=2, reduction="sum").item()
    np.testing.assert_allclose(total, per_row[1] + per_row[3], rtol=1e-12)
    mean = F.cross_entropy(device_tensor(logits), device_tensor(targets), ignore_index=2).item()
    np.testing.assert_allclose(mean, (per_row[1] + per_row[3]) / 2, rtol=1e-12)


def test_cross_entropy_label_smoothing():
    eps = 0.1
    logits = rng_array(5, 4) * 2
    targets = np.array([0, 3, 1, 1, 2])
    logp = np_log_softmax(logits)
    nll = -logp[np.arange(5), targets]
    smooth = -logp.mean(axis=-1)
    per_row = (1 - eps) * nll + eps * smooth
    loss = F.cross_entropy(device_tensor(logits), device_tensor(targets), label_smoothing=eps)
    np.testing.assert_allclose(loss.item(), per_row.mean(), rtol=1e-12)
    none = F.cross_entropy(device_tensor(logits), device_tensor(targets), label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(none.numpy(), per_row, rtol=1e-12)
    # the same as a cross-entropy against the smoothed distribution (1-eps) one_hot + eps/C
    q = np.full((5, 4), eps / 4)
    q[np.arange(5), targets] += 1 - eps
    np.testing.assert_allclose(loss.item(), -(q * logp).sum(axis=-1).mean(), rtol=1e-12)


def test_cross_entropy_label_smoothing_with_ignore_index():
    eps = 0.2
    logits = rng_array(4, 3)
    targets = np.array([1, -1, 0, 2])
    logp = np_log_softmax(logits)
    kept = targets != -1
    rows = np.arange(4)[kept]
    per_row = (1 - eps) * -logp[rows, targets[kept]] + eps * -logp[kept].mean(axis=-1)
    loss = F.cross_entropy(device_tensor(logits), device_tensor(targets), ignore_index=-1, label_smoothing=eps)
    np.testing.assert_allclose(loss.item(), per_row.mean(), rtol=1e-12)


def test_cross_entropy_sequence_logits():
    logits = rng_array(2, 3, 5)
    targets = np.array([[0, 4, 2], [1, 1, 3]])
    per_token = -np.take_along_axis(np_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    loss = F.cross_entropy(device_tensor(logits), device_tensor(targets))
    np.testing.assert_allclose(loss.item(), per_token.mean(), rtol=1e-12)
    none = F.cross_entropy(device_tensor(logits), device_tensor(targets), reduction="none")
    assert none.shape == (2, 3)
    np.testing.assert_allclose(none.numpy(), per_token, rtol=1e-12)


def test_cross_entropy_stable_at_large_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], dtype=np.float32)
    targets = np.array([0, 0])
    none = F.cross_entropy(device_tensor(logits), device_tensor(targets), reduction="none")
    assert np.isfinite(none.numpy()).all()
    # row 0: log-sum-exp is 1e4, so the loss is 0; row 1: 1e4 + log 2 - 0
    np.testing.assert_allclose(none.numpy(), [0.0, 1e4 + np.log(2.0)], rtol=1e-6, atol=1e-6)
    x = device_tensor(logits, requires_grad=True)
    F.cross_entropy(x, device_tensor(targets)).backward()
    assert np.isfinite(x.grad.numpy()).all()
    np.testing.assert_allclose(x.grad.numpy(), [[0.0, 0.0, 0.0], [-0.5, 0.25, 0.25]], atol=1e-6)


def test_cross_entropy_gradcheck_ignore_index_and_smoothing():
    logits = x64(2, 3, 4)
    targets = device_tensor(np.array([[3, -100, 0], [1, 2, -100]]))
    assert ta.gradcheck(lambda x, t: F.cross_entropy(x, t, ignore_index=-100, label_smoothing=0.1), [logits, targets])
    assert ta.gradcheck(lambda x, t: F.cross_entropy(x, t, reduction="none"), [x64(3, 4), ta.tensor([0, 3, 1])])


def test_cross_entropy_target_shape_mismatch():
    logits = ta.zeros(4, 3)
    with pytest.raises(ValueError, match="shape"):
        F.cross_entropy(logits, ta.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        F.cross_entropy(ta.zeros(2, 3, 4), ta.tensor([0, 1]))


# Targets are range-checked on the host only: reading them back from a GPU would stop it on every
# loss, and out-of-range indices there wrap around instead of raising.
HOST_ONLY_RANGE_CHECK = "cross_entropy checks target ids on the host only (see ops.check_ids_in_range)"


@pytest.mark.parametrize("bad", [3, 7, -2])
def test_cross_entropy_target_out_of_range(bad, device):
    if device != "cpu":
        pytest.skip(HOST_ONLY_RANGE_CHECK)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.cross_entropy(ta.zeros(4, 3), ta.tensor([0, bad, 1, 2]))


def test_cross_entropy_ignore_index_not_a_free_pass_for_other_negatives(device):
    if device != "cpu":
        pytest.skip(HOST_ONLY_RANGE_CHECK)
    with pytest.raises(IndexError):
        F.cross_entropy(ta.zeros(3, 3), ta.tensor([0, -100, -5]), ignore_index=-100)


def test_cross_entropy_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(ta.zeros(2, 3), ta.tensor([0, 1]), reduction="avg")


def test_cross_entropy_bad_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(ta.zeros(2, 3), ta.tensor([0, 1]), label_smoothing=1.0)


# --- layer_norm and dropout --------------------------------------------------------------

def test_layer_norm_functional_values():
    x = rng_array(3, 5) * 2 + 1
    w, b = rng_array(5, seed=1), rng_array(5, seed=2)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    normalized = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(F.layer_norm(device_tensor(x)).numpy(), normalized, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(F.layer_norm(device_tensor(x), device_tensor(w), device_tensor(b)).numpy(), normalized * w + b,
                               rtol=1e-10, atol=1e-12)


def test_layer_norm_functional_gradcheck_and_gradgradcheck(kernel_path):
    x, w, b = x64(2, 4), x64(4, seed=1), x64(4, seed=2)
    assert ta.gradcheck(F.layer_norm, [x, w, b])
    assert ta.gradcheck(lambda x: F.layer_norm(x), [x])
    if kernel_path == "composed":
        assert ta.gradgradcheck(F.layer_norm, [x, w, b])


def test_dropout_functional_not_training_is_identity():
    x = ta.randn(20, 20, generator=ta.Generator(0))
    out = F.dropout(x, 0.5, False, ta.Generator(1))
    np.testing.assert_array_equal(out.numpy(), x.numpy())
    trained = F.dropout(x, 0.5, True, ta.Generator(1)).numpy()
    assert (trained == 0).any()
    with pytest.raises(ValueError):
        F.dropout(x, 1.0, False, ta.Generator(1))


def test_cross_entropy_float_targets_are_a_clear_type_error():
    with pytest.raises(TypeError, match="integer class ids.*float32"):
        F.cross_entropy(ta.zeros(2, 3), ta.tensor([1.0, 2.0]))
