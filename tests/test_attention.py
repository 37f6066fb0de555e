"""Scaled dot-product attention, composed and fused, multi-head attention and its cache."""
import math

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import functional as F
from tinyattn import kernels
from tinyattn import nn

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(0)


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def randn(*shape, grad=True):
    return on_device(RNG.standard_normal(shape), requires_grad=grad)


def reference_attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(d)) v in plain numpy, masked entries excluded, fully masked rows zero."""
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(scores - top)
    total = e.sum(axis=-1, keepdims=True)
    weights = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return weights @ v, weights


def padding_array(lengths, size):
    """(B, 1, 1, S) on the host: key j of row b is real when j < lengths[b]."""
    return (np.arange(size)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


def padding_mask(lengths, size):
    """padding_array as a tensor on the default device."""
    return on_device(padding_array(lengths, size))


def mask_of(case):
    """The case's mask (a host array, or None) on the device the test runs on."""
    return None if case["mask"] is None else on_device(case["mask"])


CASES = {
    "plain": dict(q=(2, 3, 4), k=(2, 3, 4), mask=None, causal=False),
    "causal": dict(q=(2, 4, 3), k=(2, 4, 3), mask=None, causal=True),
    "padding": dict(q=(2, 2, 3, 4), k=(2, 2, 3, 4), mask=padding_array([3, 1], 3), causal=False),
    "cross T != S": dict(q=(2, 2, 2, 3), k=(2, 2, 5, 3), mask=padding_array([5, 2], 5), causal=False),
    "causal + padding": dict(q=(2, 1, 4, 3), k=(2, 1, 4, 3), mask=padding_array([4, 2], 4), causal=True),
    "one query (a decoding step)": dict(q=(2, 2, 1, 3), k=(2, 2, 5, 3), mask=padding_array([5, 2], 5), causal=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_values_match_numpy(case, kernel_path):
    q, k, v = randn(*case["q"]), randn(*case["k"]), randn(*case["k"])
    out, weights = F.scaled_dot_product_attention(q, k, v, mask=mask_of(case), causal=case["causal"],
                                                  return_weights=True)
    allowed = case["mask"] if case["mask"] is not None else np.ones((1,), dtype=bool)
    if case["causal"]:
        allowed = allowed & np.tril(np.ones((case["q"][-2], case["k"][-2]), dtype=bool))
    expected_out, expected_weights = reference_attention(q.numpy(), k.numpy(), v.numpy(), allowed)
    np.testing.assert_allclose(out.numpy(), expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weights.numpy(), expected_weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_composed_attention_gradcheck_and_gradgradcheck(case):
    q, k, v = randn(*case["q"]), randn(*case["k"]), randn(*case["k"])

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, mask=mask_of(case), causal=case["causal"])

    with kernels.use("composed"):
        assert ta.gradcheck(attend, [q, k, v])
        assert ta.gradgradcheck(attend, [q, k, v], fast=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_attention_gradcheck(case):
    q, k, v = randn(*case["q"]), randn(*case["k"]), randn(*case["k"])
    assert ta.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=mask_of(case), causal=case["causal"]),
                        [q, k, v])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_and_composed_agree_in_values_and_gradients(case):
    q, k, v = randn(*case["q"]), randn(*case["k"]), randn(*case["k"])
    upstream = RNG.standard_normal(case["q"][:-1] + (case["k"][-1],))
    results = []
    for path in ("composed", "fused"):
        with kernels.use(path):
            out = F.scaled_dot_product_attention(q, k, v, mask=mask_of(case), causal=case["causal"])
            grads = ta.grad(out, [q, k, v], grad_outputs=on_device(upstream))
        results.append([out.numpy()] + [g.numpy() for g in grads])
    for composed, fused in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-6, atol=1e-6)


def test_masked_positions_get_exactly_zero_weight_and_rows_sum_to_one(kernel_path):
    q, k, v = randn(2, 2, 4, 8, grad=False), randn(2, 2, 4, 8, grad=False), randn(2, 2, 4, 8, grad=False)
    mask = padding_mask([4, 2], 4)
    _, weights = F.scaled_dot_product_attention(q.astype(ta.float32), k.astype(ta.float32), v.astype(ta.float32),
                                                mask=mask, causal=True, return_weights=True)
    w = weights.numpy()
    allowed = mask.numpy() & np.tril(np.ones((4, 4), dtype=bool))
    assert np.all(w[~np.broadcast_to(allowed, w.shape)] == 0.0)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-6)


def test_a_fully_masked_query_yields_zeros_not_nan(kernel_path):
    q, k, v = randn(1, 2, 3), randn(1, 3, 3), randn(1, 3, 3)
    mask = on_device(np.array([[True, False, True], [False, False, False]]))
    out, weights = F.scaled_dot_product_attention(q, k, v, mask=mask, return_weights=True)
    assert np.all(out.numpy()[0, 1] == 0.0) and np.all(weights.numpy()[0, 1] == 0.0)
    out.sum().backward()
    assert np.all(np.isfinite(q.grad.numpy())) and np.all(q.grad.numpy()[0, 1] == 0.0)


def test_fused_attention_refuses_create_graph_and_says_what_to_use():
    q, k, v = randn(1, 2, 3), randn(1, 2, 3), randn(1, 2, 3)
    out = F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match=r"first-order.*kernels.use\('composed'\)"):
        ta.grad(out.sum(), q, create_graph=True)


def test_attention_dropout_is_seeded_and_scales_survivors():
    q, k, v = randn(1, 4, 4, grad=False), randn(1, 4, 4, grad=False), on_device(np.eye(4)[None])
    outs = []
    for path in ("composed", "fused"):
        with kernels.use(path):
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=ta.Generator(5)).numpy())
    _, weights = F.scaled_dot_product_attention(q, k, v, return_weights=True)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12)
    kept = outs[0] != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(outs[0][kept], 2.0 * weights.numpy()[kept], rtol=1e-12)


def test_attention_shape_and_mask_errors():
    q, k = randn(2, 3, 4, grad=False), randn(2, 5, 4, grad=False)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\), \(2, 5, 4\), \(2, 4, 4\)"):
        F.scaled_dot_product_attention(q, k, randn(2, 4, 4, grad=False))
    with pytest.raises(TypeError, match="boolean"):
        F.scaled_dot_product_attention(q, k, k, mask=ta.ones(3, 5))
    with pytest.raises(ValueError, match="generator"):
        F.scaled_dot_product_attention(q, k, k, dropout_p=0.1)


# --- MultiHeadAttention --------------------------------------------------------------------

def make_mha(d_model=8, n_heads=2, seed=0, **options):
    return nn.MultiHeadAttention(d_model, n_heads, generator=ta.Generator(seed), dtype=ta.float64, **options)


def test_mha_equals_per_head_attention_computed_by_hand():
    mha = make_mha()
    x = RNG.standard_normal((2, 3, 8))
    out, weights = mha(on_device(x), need_weights=True)

    def project(linear, inputs):
        return inputs @ linear.weight.numpy().T + linear.bias.numpy()

    q, k, v = (project(p, x).reshape(2, 3, 2, 4).transpose(0, 2, 1, 3) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
    heads, expected_weights = reference_attention(q, k, v)
    expected = project(mha.out_proj, heads.transpose(0, 2, 1, 3).reshape(2, 3, 8))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    assert weights.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(weights.numpy(), expected_weights, rtol=1e-12)


def test_mha_has_pytorch_style_projections_and_rejects_bad_heads():
    mha = make_mha(d_model=8, n_heads=4)
    assert [name for name, _ in mha.named_parameters()] == [
        f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")]
    assert mha.q_proj.weight.shape == (8, 8)
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_heads \(4\)"):
        nn.MultiHeadAttention(10, 4)


def test_mha_gradcheck_self_and_cross_attention(kernel_path):
    mha = make_mha()
    x, context = randn(2, 3, 8), randn(2, 5, 8)
    mask = padding_mask([5, 3], 5)
    params = mha.parameters()
    assert ta.gradcheck(lambda x, *ps: mha(x, causal=True)[0], [x, *params], fast=True)
    assert ta.gradcheck(lambda x, c, *ps: mha(x, context=c, mask=mask)[0], [x, context, *params], fast=True)


def test_mha_input_shape_errors():
    mha = make_mha()
    with pytest.raises(ValueError, match=r"\(batch, length, 8\).*\(2, 3, 6\)"):
        mha(randn(2, 3, 6))
    with pytest.raises(ValueError, match="context"):
        mha(randn(2, 3, 8), context=randn(3, 4, 8))


def test_mha_self_attention_cache_matches_full_causal_pass(kernel_path):
    mha = make_mha()
    x = randn(2, 5, 8, grad=False)
    full, full_weights = mha(x, causal=True, need_weights=True)
    cache = {}
    with ta.no_grad():  # decoding: the fused block takes the cache under no_grad
        steps = [mha(x[:, t:t + 1], causal=True, need_weights=True, cache=cache) for t in range(5)]
    np.testing.assert_allclose(ta.concatenate([s[0] for s in steps], axis=1).numpy(), full.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(steps[-1][1].numpy()[:, :, 0], full_weights.numpy()[:, :, -1], rtol=1e-12)
    assert cache["k"].shape == (2, 2, 5, 4)


def test_mha_cross_attention_cache_projects_the_context_once(kernel_path):
    mha = make_mha()
    x, context = randn(1, 3, 8, grad=False), randn(1, 4, 8, grad=False)
    cache = {}
    with ta.no_grad():
        first, _ = mha(x[:, :1], context=context, cache=cache)
        keys = cache["k"]
        second, _ = mha(x[:, 1:2], context=context, cache=cache)
    assert cache["k"] is keys
    full, _ = mha(x, context=context)
    np.testing.assert_allclose(second.numpy(), full.numpy()[:, 1:2], rtol=1e-12)


def test_weights_returned_under_recording_carry_gradient_even_when_fused():
    q, k, v = randn(1, 3, 4), randn(1, 3, 4), randn(1, 3, 4)
    grads = []
    for path in ("composed", "fused"):
        with kernels.use(path):
            out, weights = F.scaled_dot_product_attention(q, k, v, return_weights=True)
            grads.append(ta.grad(out.sum() + (weights * weights).sum(), [q])[0].numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12)


def test_a_cache_while_gradients_are_recorded_runs_the_composed_block_and_says_so_once():
    mha = make_mha()
    x = randn(1, 2, 8)
    kernels._warned.clear()
    with pytest.warns(UserWarning, match="multi-head attention: a key/value cache while gradients are recorded"):
        out, _ = mha(x, causal=True, cache={})
    assert type(out.grad_fn).__name__ != "FusedMultiHeadAttention"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mha(x, causal=True, cache={})  # said once, not again
