"""Fused Functions against their composed twins: same values, same gradients, first-order only."""
import numpy as np
import pytest

import tinyattn as ta
from tinyattn import functional as F
from tinyattn import nn

RNG = np.random.default_rng(7)


def randn(*shape, grad=True, scale=1.0):
    return ta.tensor(scale * RNG.standard_normal(shape), requires_grad=grad)


def values_and_grads(fn, inputs, upstream):
    out = fn(*inputs)
    grads = ta.grad(out, inputs, grad_outputs=upstream, allow_unused=True)
    return [out.numpy()] + [g.numpy() for g in grads]


def assert_twins_agree(fused_fn, composed_fn, inputs, out_shape, rtol=1e-10, atol=1e-12):
    upstream = RNG.standard_normal(out_shape) if out_shape else np.array(1.0)
    for fused, composed in zip(values_and_grads(fused_fn, inputs, upstream), values_and_grads(composed_fn, inputs, upstream)):
        np.testing.assert_allclose(fused, composed, rtol=rtol, atol=atol)


def test_layer_norm_fused_equals_composed():
    x, w, b = randn(2, 3, 5), randn(5), randn(5)
    assert_twins_agree(lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, w, b, fused=False),
                       [x, w, b], (2, 3, 5))


@pytest.mark.parametrize("ignore_index", [None, 0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_fused_equals_composed_and_passes_gradcheck(ignore_index, smoothing, reduction):
    logits = randn(2, 4, 6, scale=3.0)
    targets = ta.tensor(np.array([[1, 0, 5, 2], [0, 0, 3, 4]]))
    options = dict(ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    shape = (2, 4) if reduction == "none" else ()
    assert_twins_agree(lambda z: F.cross_entropy(z, targets, **options),
                       lambda z: F.cross_entropy(z, targets, fused=False, **options), [logits], shape)
    assert ta.gradcheck(lambda z: F.cross_entropy(z, targets, **options), [logits])


def test_fused_cross_entropy_is_stable_for_huge_logits():
    logits = ta.tensor(np.array([[1e4, 0.0, -1e4]], dtype=np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, ta.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(), [[1.0, -1.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("fn, twin", [
    (lambda x: F.layer_norm(x, ta.ones(3, dtype=ta.float64), ta.zeros(3, dtype=ta.float64)), "fused=False"),
    (lambda x: F.cross_entropy(x, ta.tensor([0, 2])), "fused=False"),
    (lambda x: F.scaled_dot_product_attention(x, x, x), "fused=False"),
])
def test_fused_functions_refuse_create_graph_and_name_the_twin(fn, twin):
    x = randn(2, 3)
    with pytest.raises(RuntimeError, match=f"first-order.*{twin}"):
        ta.grad(fn(x).sum(), x, create_graph=True)


def test_linear_function_differentiates_twice():
    x, w, b = randn(2, 3, 4), randn(5, 4), randn(5)
    assert ta.gradcheck(F.linear, [x, w, b])
    assert ta.gradgradcheck(F.linear, [x, w, b])
    assert ta.gradgradcheck(lambda x, w: F.linear(x, w), [x, w])


def test_embedding_gradient_is_the_one_hot_product():
    table = randn(5, 3)
    ids = ta.tensor(np.array([[1, 4, 1], [0, 1, 4]]))
    upstream = RNG.standard_normal((2, 3, 3))
    (grad,) = [ta.grad(F.embedding(ids, table), table, grad_outputs=upstream)]
    expected = np.zeros((5, 3))
    np.add.at(expected, ids.numpy().reshape(-1), upstream.reshape(-1, 3))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12)
    assert ta.gradgradcheck(lambda t: F.embedding(ids, t), [table])


def twin_attention_layers(dropout=0.0):
    return [nn.MultiHeadAttention(8, 2, dropout=dropout, generator=ta.Generator(3), dtype=ta.float64, fused=fused)
            for fused in (True, False)]


PADDING = ta.tensor(np.array([[True] * 5, [True, True, False, False, False]]))[:, None, None, :]


@pytest.mark.parametrize("cross, mask, causal", [(False, None, False), (False, None, True), (True, PADDING, False),
                                                 (False, ta.tensor(np.array([[True] * 4, [True, True, True, False]]))[:, None, None, :], True)])
def test_fused_multi_head_attention_equals_composed(cross, mask, causal):
    fused, composed = twin_attention_layers()
    x, context = randn(2, 4, 8), randn(2, 5, 8)

    def run(layer):
        def fn(x, context, *params):
            return layer(x, context=context if cross else None, mask=mask, causal=causal)[0]
        return fn

    inputs = [x, context]
    upstream = RNG.standard_normal((2, 4, 8))
    results = []
    for layer in (fused, composed):
        out = run(layer)(*inputs)
        results.append([out.numpy()] + [g.numpy() for g in ta.grad(out, inputs + layer.parameters(), grad_outputs=upstream,
                                                                     allow_unused=True) if g is not None])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert ta.gradcheck(run(fused), [x, context, *fused.parameters()], fast=True)


def test_fused_multi_head_attention_dropout_matches_composed_with_the_same_seed():
    fused, composed = twin_attention_layers(dropout=0.5)
    x = randn(2, 4, 8, grad=False)
    np.testing.assert_allclose(fused(x)[0].numpy(), composed(x)[0].numpy(), rtol=1e-12)
    fused.eval()
    np.testing.assert_array_equal(fused(x)[0].numpy(), fused(x)[0].numpy())


def test_attention_rows_far_below_the_block_maximum_fall_back_to_per_row_softmax():
    q = RNG.standard_normal((1, 1, 3, 4))
    q[0, 0, 0] *= 400.0  # scores of row 0 dwarf the others: their exp would underflow against the block max
    k, v = randn(1, 1, 3, 4), randn(1, 1, 3, 4)
    q = ta.tensor(q, requires_grad=True)
    assert_twins_agree(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                       lambda q, k, v: F.scaled_dot_product_attention(q, k, v, fused=False), [q, k, v], (1, 1, 3, 4))
    out = F.scaled_dot_product_attention(q, k, v, return_weights=True)[1].numpy()
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_feed_forward_equals_composed(dropout):
    fused, composed = (nn.FeedForward(6, 10, dropout=dropout, generator=ta.Generator(4), dtype=ta.float64, fused=flag)
                       for flag in (True, False))
    x = randn(2, 3, 6)
    upstream = RNG.standard_normal((2, 3, 6))
    results = []
    for layer in (fused, composed):
        out = layer(x)
        results.append([out.numpy()] + [g.numpy() for g in ta.grad(out, [x] + layer.parameters(), grad_outputs=upstream)])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    if dropout == 0.0:  # with dropout every call draws a new mask, so finite differences would not see one function
        assert ta.gradcheck(lambda x, *ps: fused(x), [x, *fused.parameters()])


def test_a_layer_built_with_fused_false_differentiates_twice():
    layer = nn.EncoderLayer(8, 2, 12, generator=ta.Generator(5), dtype=ta.float64, fused=False)
    x = randn(1, 3, 8)
    assert ta.gradgradcheck(lambda x: layer(x)[0], [x], fast=True)
    fused_layer = nn.EncoderLayer(8, 2, 12, generator=ta.Generator(5), dtype=ta.float64)
    np.testing.assert_allclose(fused_layer(x)[0].numpy(), layer(x)[0].numpy(), rtol=1e-12)


@pytest.mark.parametrize("cross", [False, True])
def test_residual_added_inside_the_fused_attention_block(cross):
    fused, composed = twin_attention_layers()
    x, context, skip = randn(2, 4, 8), randn(2, 5, 8), randn(2, 4, 8)

    def run(layer):
        return lambda x, context, skip, *params: layer(x, context=context if cross else None, residual=skip)[0]

    upstream = RNG.standard_normal((2, 4, 8))
    results = []
    for layer in (fused, composed):
        out = run(layer)(x, context, skip)
        grads = ta.grad(out, [x, context, skip], grad_outputs=upstream, allow_unused=True)
        results.append([out.numpy()] + [g.numpy() for g in grads if g is not None])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results[0][0], fused(x, context=context if cross else None)[0].numpy() + skip.numpy(), rtol=1e-12)
    assert ta.gradcheck(run(fused), [x, context, skip, *fused.parameters()], fast=True)


def test_residual_added_inside_the_fused_feed_forward_block():
    fused, composed = (nn.FeedForward(6, 10, generator=ta.Generator(4), dtype=ta.float64, fused=flag) for flag in (True, False))
    x, skip = randn(2, 3, 6), randn(2, 3, 6)
    np.testing.assert_allclose(fused(x, residual=skip).numpy(), composed(x).numpy() + skip.numpy(), rtol=1e-12)
    assert ta.gradcheck(lambda x, skip, *ps: fused(x, residual=skip), [x, skip, *fused.parameters()])


@pytest.mark.parametrize("layer_class", [nn.EncoderLayer, nn.DecoderLayer])
def test_whole_layers_fused_equal_composed_with_norms_folded_and_residuals_inside(layer_class):
    """Norm scale and shift folded into the projections, residuals added inside the blocks:
    every value and every gradient must match the layer built from composed ops."""
    fused, composed = (layer_class(8, 2, 12, generator=ta.Generator(9), dtype=ta.float64, fused=flag) for flag in (True, False))
    for layer in (fused, composed):  # norms away from their initial 1 and 0, so that folding matters
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.data[...] = RNG.standard_normal(p.shape)
        composed.load_state_dict(fused.state_dict())
    x, memory = randn(2, 4, 8), randn(2, 5, 8)
    mask = ta.tensor(np.array([[True] * 5, [True, True, True, False, False]]))[:, None, None, :]
    args = (x, memory) if layer_class is nn.DecoderLayer else (x,)
    kwargs = dict(memory_mask=mask) if layer_class is nn.DecoderLayer else dict(mask=mask[:, :, :, :4])
    upstream = RNG.standard_normal((2, 4, 8))
    results = []
    for layer in (fused, composed):
        out = layer(*args, **kwargs)[0]
        grads = ta.grad(out, [*args, *layer.parameters()], grad_outputs=upstream)
        results.append([out.numpy()] + [g.numpy() for g in grads])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    assert ta.gradcheck(lambda *inputs: fused(*inputs[:len(args)], **kwargs)[0], [*args, *fused.parameters()], fast=True)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_block_with_a_folded_norm_equals_norm_then_block(cross):
    fused, composed = twin_attention_layers()
    norm = nn.LayerNorm(8, dtype=ta.float64)
    norm.weight.data[...], norm.bias.data[...] = RNG.standard_normal(8), RNG.standard_normal(8)
    x, context = randn(2, 4, 8), randn(2, 5, 8)
    context_arg = context if cross else None
    folded = fused(x, context=context_arg, norm=norm, residual=x)[0]
    expected = x.numpy() + composed(norm(x), context=context_arg)[0].numpy()
    np.testing.assert_allclose(folded.numpy(), expected, rtol=1e-10)
    params = [x, context, norm.weight, norm.bias, *fused.parameters()]
    assert ta.gradcheck(lambda x, c, *ps: fused(x, context=c if cross else None, norm=norm, residual=x)[0], params, fast=True)
