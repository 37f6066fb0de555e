"""Each kernel's fused Function against its composed reference, and the one switch between them.

For every kernel: the same values and every gradient at float64 on both paths, a gradient
check of the fused path, gradients of gradients on the composed path and a clear refusal
on the fused one. Then the switch: it selects each path for a whole model (the op hooks
record which Functions ran), carries into the threads of a sharded step, and is refused
for an unknown name.
"""
import warnings

import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from models.training import forward_backward
from tinyattn import kernels, nn
from tinyattn import functional as F
from tinyattn.kernels.layer_norm import DeferredLayerNorm
from tinyattn.parallel import ShardedBackward
from tinyattn.tasks import SequenceTask

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(7)


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def randn(*shape, grad=True, scale=1.0):
    return on_device(scale * RNG.standard_normal(shape), requires_grad=grad)


def on_both_paths(fn, inputs, upstreams):
    """{path: [each output's values, then the gradient of every input]} for fn(*inputs) run on
    each kernels path; the outputs' gradients are `upstreams` (one array per output)."""
    results = {}
    for path in kernels.CHOICES:
        with kernels.use(path):
            outputs = fn(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            loss = sum((output * on_device(upstream)).sum() for output, upstream in zip(outputs, upstreams))
            grads = ta.grad(loss, inputs, allow_unused=True)
        results[path] = [o.numpy() for o in outputs] + [None if g is None else g.numpy() for g in grads]
    return results


def assert_paths_agree(fn, inputs, output_shapes, rtol=1e-10, atol=1e-12):
    results = on_both_paths(fn, inputs, [RNG.standard_normal(shape) for shape in output_shapes])
    assert len(results["fused"]) == len(results["composed"])
    for index, (fused, composed) in enumerate(zip(results["fused"], results["composed"])):
        assert (fused is None) == (composed is None), index
        if fused is not None:
            np.testing.assert_allclose(fused, composed, rtol=rtol, atol=atol, err_msg=f"output or gradient {index}")


def random_parameters(module):
    """Parameters away from their initial values (norms' 1 and 0 included), so that every term matters."""
    for p in module.parameters():
        p.data[...] = ta.tensor(RNG.standard_normal(p.shape) * 0.5, dtype=p.dtype, device=p.device).data
    return module


# --- layer norm, cross-entropy, feed-forward ---------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["scale-and-shift", "plain"])
def test_layer_norm_paths_agree(affine):
    x, w, b = randn(2, 3, 5), randn(5), randn(5)
    inputs = [x, w, b] if affine else [x]
    assert_paths_agree(lambda x, *wb: F.layer_norm(x, *wb), inputs, [(2, 3, 5)])
    assert ta.gradcheck(lambda x, *wb: F.layer_norm(x, *wb), inputs)


def test_a_deferred_layer_norm_is_computed_once_when_read_and_keeps_its_grad_mode():
    x, w, b = randn(2, 5), randn(5), randn(5)
    normalized = F.layer_norm(x, w, b)
    assert isinstance(normalized, DeferredLayerNorm) and normalized.shape == (2, 5)
    with ta.no_grad():  # read under no_grad, yet made while recording: its graph is kept
        first = normalized.data
    assert normalized.data is first and normalized.grad_fn is not None
    with kernels.use("composed"):
        expected = F.layer_norm(x, w, b)
    np.testing.assert_allclose(normalized.numpy(), expected.numpy(), rtol=1e-12)  # .numpy() reads `first`, computed once
    normalized.sum().backward()
    assert w.grad is not None and x.grad is not None


@pytest.mark.parametrize("ignore_index", [None, 0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_paths_agree(ignore_index, smoothing, reduction):
    logits = randn(2, 4, 6, scale=3.0)
    targets = on_device(np.array([[1, 0, 5, 2], [0, 0, 3, 4]]))
    options = dict(ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    assert_paths_agree(lambda z: F.cross_entropy(z, targets, **options), [logits], [(2, 4) if reduction == "none" else ()])
    assert ta.gradcheck(lambda z: F.cross_entropy(z, targets, **options), [logits])


def test_fused_cross_entropy_is_stable_for_huge_logits():
    logits = on_device(np.array([[1e4, 0.0, -1e4]], dtype=np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, ta.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(), [[1.0, -1.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_feed_forward_paths_agree(activation, dropout):
    """Two layers built alike, one per path: with dropout they draw the same masks from generators seeded alike."""
    x = randn(2, 3, 6)
    upstream = on_device(RNG.standard_normal((2, 3, 6)))
    results = {}
    for path in kernels.CHOICES:
        layer = nn.FeedForward(6, 10, dropout=dropout, activation=activation, generator=ta.Generator(4), dtype=ta.float64)
        with kernels.use(path):
            out = layer(x)
            grads = ta.grad((out * upstream).sum(), [x, *layer.parameters()])
        results[path] = [out.numpy()] + [g.numpy() for g in grads]
    for fused, composed in zip(results["fused"], results["composed"]):
        np.testing.assert_allclose(fused, composed, rtol=1e-10, atol=1e-12)
    if not dropout:  # with dropout every call draws a new mask, so finite differences would not see one function
        assert ta.gradcheck(lambda x, *ps: layer(x), [x, *layer.parameters()])


def test_feed_forward_without_biases_takes_the_fused_path():
    x, w1, w2 = randn(2, 6), randn(10, 6), randn(6, 10)
    assert_paths_agree(lambda x, w1, w2: kernels.feed_forward.feed_forward(x, w1, None, w2, None, "gelu"),
                       [x, w1, w2], [(2, 6)])


@pytest.mark.parametrize("sublayer", ["feed-forward", "self-attention", "cross-attention"])
def test_a_block_after_a_layer_norm_folds_the_norm_and_equals_norm_then_block(sublayer, function_calls):
    """The module reads block(norm(x)); the fused block takes x and the norm's parameters instead."""
    norm = random_parameters(nn.LayerNorm(8, dtype=ta.float64))
    if sublayer == "feed-forward":
        block = random_parameters(nn.FeedForward(8, 12, generator=ta.Generator(2), dtype=ta.float64))
        run = lambda x, context, *params: block(norm(x))  # noqa: E731
    else:
        block = random_parameters(nn.MultiHeadAttention(8, 2, generator=ta.Generator(2), dtype=ta.float64))
        run = lambda x, context, *params: block(norm(x), context=context if sublayer == "cross-attention" else None)[0]  # noqa: E731
    x, context = randn(2, 4, 8), randn(2, 5, 8)
    names = {name for _, name in function_calls(lambda: run(x, context).sum().backward())}
    assert "FusedLayerNorm" not in names  # folded: the norm's output was never computed on its own
    assert_paths_agree(run, [x, context, *norm.parameters(), *block.parameters()], [(2, 4, 8)])
    assert ta.gradcheck(run, [x, context, *norm.parameters(), *block.parameters()], fast=True)


# --- attention ------------------------------------------------------------------------------------

# Masks as host arrays: each test puts its mask on the device it runs on (mask_on_device).
PADDING = np.array([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
FULLY_MASKED_ROW = np.array([[[True] * 4, [False] * 4, [True, True, False, False]]])


def mask_on_device(mask):
    return None if mask is None else on_device(mask)


@pytest.mark.parametrize("mask, causal, return_weights", [
    (None, False, False), (None, True, True), (FULLY_MASKED_ROW, False, True), (FULLY_MASKED_ROW, True, False)],
    ids=["plain", "causal, weights", "a fully masked row, weights", "masked and causal"])
def test_scaled_dot_product_attention_paths_agree(mask, causal, return_weights):
    q, k, v = randn(2, 3, 4), randn(2, 4, 4), randn(2, 4, 4)
    mask = mask_on_device(mask)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, return_weights=return_weights)
    shapes = [(2, 3, 4), (2, 3, 4)] if return_weights else [(2, 3, 4)]
    assert_paths_agree(attend, [q, k, v], shapes)  # with weights, a loss on the weights too
    assert ta.gradcheck(lambda q, k, v: sum(o.sum() * (i + 1) for i, o in enumerate(
        attend(q, k, v) if return_weights else (attend(q, k, v),))), [q, k, v])


def test_attention_rows_far_below_the_block_maximum_fall_back_to_per_row_softmax():
    q = RNG.standard_normal((1, 1, 3, 4))
    q[0, 0, 0] *= 400.0  # scores of row 0 dwarf the others: their exp would underflow against the block max
    q = on_device(q, requires_grad=True)
    k, v = randn(1, 1, 3, 4), randn(1, 1, 3, 4)
    assert_paths_agree(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [q, k, v], [(1, 1, 3, 4)])
    weights = F.scaled_dot_product_attention(q, k, v, return_weights=True)[1].numpy()
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("cross, mask, causal, bias", [
    (False, None, False, True), (False, None, True, True), (True, PADDING, False, True),
    (False, PADDING[:, :, :, :4], True, True), (True, None, False, False)],
    ids=["self", "causal", "cross with padding", "causal with padding", "cross without biases"])
def test_multi_head_attention_paths_agree_on_output_and_weights(cross, mask, causal, bias):
    layer = random_parameters(nn.MultiHeadAttention(8, 2, bias=bias, generator=ta.Generator(3), dtype=ta.float64))
    x, context = randn(2, 4, 8), randn(2, 5, 8)
    source = 5 if cross else 4
    mask = mask_on_device(mask)

    def run(x, context, *params):
        return layer(x, context=context if cross else None, mask=mask, causal=causal, need_weights=True)

    inputs = [x, context, *layer.parameters()]
    assert_paths_agree(run, inputs, [(2, 4, 8), (2, 2, 4, source)])
    assert ta.gradcheck(lambda *a: run(*a)[0], inputs, fast=True)


def test_multi_head_attention_dropout_is_the_same_on_both_paths_with_the_same_seed():
    x = randn(2, 4, 8, grad=False)
    outputs = []
    for path in kernels.CHOICES:
        layer = nn.MultiHeadAttention(8, 2, dropout=0.5, generator=ta.Generator(3), dtype=ta.float64)
        with kernels.use(path):
            outputs.append(layer(x)[0].numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-12)


@pytest.mark.parametrize("layer_class", [nn.EncoderLayer, nn.DecoderLayer])
def test_whole_layers_agree_with_norms_folded(layer_class):
    layer = random_parameters(layer_class(8, 2, 12, generator=ta.Generator(9), dtype=ta.float64))
    x, memory = randn(2, 4, 8), randn(2, 5, 8)
    mask = on_device(np.array([[True] * 5, [True, True, True, False, False]]))[:, None, None, :]
    if layer_class is nn.DecoderLayer:
        run = lambda x, memory, *ps: layer(x, memory, memory_mask=mask)[0]  # noqa: E731
    else:
        run = lambda x, memory, *ps: layer(x, mask=mask[:, :, :, :4])[0]  # noqa: E731
    inputs = [x, memory, *layer.parameters()]
    assert_paths_agree(run, inputs, [(2, 4, 8)], rtol=1e-9, atol=1e-11)
    assert ta.gradcheck(run, inputs, fast=True)
    with kernels.use("composed"):
        assert ta.gradgradcheck(lambda x: run(x, memory), [x], fast=True)


@pytest.mark.parametrize("model", ["transformer", "gpt", "rnn-attention"])
def test_cached_decoding_is_the_same_on_both_paths(model):
    task = SequenceTask("reverse", 6, 1, 6)
    batch = next(task.batches(8, 0))
    decoded = {}
    for path in kernels.CHOICES:
        net = build_model(Config(model=model, vocab=6, max_len=6, d_model=16, heads=2, layers=2, d_ff=32), task.vocab_size)
        with kernels.use(path):
            rows, maps = net.greedy_decode(batch.source, 7, need_weights=True)
        decoded[path] = rows, maps
    assert decoded["fused"][0] == decoded["composed"][0]
    for fused, composed in zip(decoded["fused"][1], decoded["composed"][1]):
        np.testing.assert_allclose(fused, composed, rtol=1e-5, atol=1e-6)


# --- recurrent -------------------------------------------------------------------------------------

def test_gru_cell_paths_agree():
    cell = nn.GRUCell(3, 4, generator=ta.Generator(5), dtype=ta.float64)
    assert_paths_agree(lambda x, h, *ps: cell(x, h), [randn(2, 3), randn(2, 4), *cell.parameters()], [(2, 4)])


@pytest.mark.parametrize("mask", [None, np.array([[True, True, False], [False, False, False]])],
                         ids=["no mask", "padding and a row without keys"])
def test_additive_attention_paths_agree_on_context_and_weights(mask):
    mask = mask_on_device(mask)
    attention = nn.AdditiveAttention(4, 4, 6, generator=ta.Generator(6), dtype=ta.float64)
    inputs = [randn(2, 4), randn(2, 3, 4), *attention.parameters()]
    assert_paths_agree(lambda q, k, *ps: attention(q, k, mask=mask), inputs, [(2, 4), (2, 3)])
    assert ta.gradcheck(lambda q, k, *ps: attention(q, k, mask=mask)[0], inputs)


# --- first order only on the fused path -------------------------------------------------------------

@pytest.mark.parametrize("name, fn", [
    ("layer norm", lambda x: F.layer_norm(x, ta.ones(3, dtype=ta.float64), ta.zeros(3, dtype=ta.float64))),
    ("cross-entropy", lambda x: F.cross_entropy(x, ta.tensor([0, 2]))),
    ("attention", lambda x: F.scaled_dot_product_attention(x, x, x)),
    ("feed-forward", lambda x: kernels.feed_forward.feed_forward(x, x.T @ x, None, x.T @ x, None)),
])
def test_fused_kernels_refuse_create_graph_and_say_to_switch(name, fn):
    x = randn(2, 3)
    with pytest.raises(RuntimeError, match=rf"fused {name} supports first-order gradients only.*kernels.use\('composed'\)"):
        ta.grad(fn(x).sum(), x, create_graph=True)
    with kernels.use("composed"):
        ta.grad(fn(x).sum(), x, create_graph=True)  # the composed reference differentiates twice


# --- the switch ------------------------------------------------------------------------------------

# The Functions each model's kernels are made of, on the fused path; the composed path runs none of them.
FUSED_FUNCTIONS = {
    "transformer": {"FusedMultiHeadAttention", "FusedFeedForward", "FusedLayerNorm", "FusedCrossEntropyRows"},
    "gpt": {"FusedMultiHeadAttention", "FusedFeedForward", "FusedLayerNorm", "FusedCrossEntropyRows"},
    "rnn-attention": {"FusedGRUCell", "FusedAdditiveAttention", "FusedCrossEntropyRows"},
    "rnn": {"FusedGRUCell", "FusedCrossEntropyRows"},
}
# Functions only composed references use: softmax and log-softmax, the layer norm's pieces.
COMPOSED_ONLY = {"Softmax", "LogSoftmax", "Sqrt", "Sigmoid", "Tanh"}
# Of those, what a model runs itself, on either path: the GRU models' tanh from the encoder's final
# states to the decoder's first (their composed GRU steps still show as Sigmoid).
MODEL_OWN = {"rnn": {"Tanh"}, "rnn-attention": {"Tanh"}}


@pytest.mark.parametrize("model", sorted(FUSED_FUNCTIONS))
def test_the_switch_selects_each_path_for_a_whole_model(model, kernel_path, function_calls):
    """A training step and a cached decode run only fused kernels, or only composed ones: a module
    that ignored the switch would show up here."""
    task = SequenceTask("reverse", 5, 1, 5)
    batch = next(task.batches(6, 0))
    net = build_model(Config(model=model, vocab=5, max_len=5, d_model=8, heads=2, layers=1, d_ff=16), task.vocab_size)

    def step_and_decode():
        forward_backward(net, net.parameters(), batch, ShardedBackward(1))
        net.greedy_decode(batch.source, 6, need_weights=True)

    names = {name for _, name in function_calls(step_and_decode)}
    fused_ran = {name for name in names if name.startswith("Fused")}
    if kernel_path == "fused":
        assert fused_ran == FUSED_FUNCTIONS[model]
        assert not names & (COMPOSED_ONLY - MODEL_OWN.get(model, set()))
    else:
        assert fused_ran == set()
        assert "Softmax" in names or model == "rnn"


def test_the_switch_carries_into_the_threads_of_a_sharded_step(function_calls):
    task = SequenceTask("reverse", 5, 1, 5)
    batch = next(task.batches(8, 0))
    net = build_model(Config(model="transformer", vocab=5, max_len=5, d_model=8, heads=2, layers=1, d_ff=16), task.vocab_size)
    with kernels.use("composed"):
        sharded = ShardedBackward(2)
        seen = function_calls(lambda: forward_backward(net, net.parameters(), batch, sharded))
    assert seen and not any(name.startswith("Fused") for _, name in seen)
    results = {}
    for path in kernels.CHOICES:
        net.zero_grad()
        with kernels.use(path):
            loss, _ = forward_backward(net, net.parameters(), batch, ShardedBackward(2))
        results[path] = loss.item(), [p.grad.numpy() for p in net.parameters()]
    assert results["fused"][0] == pytest.approx(results["composed"][0], rel=1e-5)
    for fused, composed in zip(results["fused"][1], results["composed"][1]):
        np.testing.assert_allclose(fused, composed, rtol=1e-3, atol=1e-5)


def test_the_default_is_fused_and_an_unknown_path_is_refused():
    assert kernels.selected() == "fused"
    with kernels.use("composed"):
        assert kernels.selected() == "composed"
    assert kernels.selected() == "fused"
    with pytest.raises(ValueError, match="kernels must be one of fused, composed, got 'fast'"):
        with kernels.use("fast"):
            pass


def test_training_never_warns_about_the_path():
    """The one documented fallback (a cache while recording) is not something training or decoding meets."""
    task = SequenceTask("copy", 5, 1, 5)
    batch = next(task.batches(6, 0))
    net = build_model(Config(model="gpt", vocab=5, max_len=5, d_model=8, heads=2, layers=1, d_ff=16), task.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward_backward(net, net.parameters(), batch, ShardedBackward(1))
        net.greedy_decode(batch.source, 6)


@pytest.mark.parametrize("model", ["transformer", "gpt"])
def test_every_pre_ln_norm_is_folded_in_a_training_step(model, function_calls):
    """Only the stacks' final norms, read by the output head and by cross-attention, are computed
    on their own: a fused step runs FusedLayerNorm once per stack, whatever the number of layers."""
    task = SequenceTask("reverse", 5, 1, 5)
    batch = next(task.batches(6, 0))
    net = build_model(Config(model=model, vocab=5, max_len=5, d_model=8, heads=2, layers=3, d_ff=16), task.vocab_size)
    calls = function_calls(lambda: forward_backward(net, net.parameters(), batch, ShardedBackward(1)))
    assert calls.count(("forward", "FusedLayerNorm")) == (2 if model == "transformer" else 1)


@pytest.mark.parametrize("sublayer", ["feed-forward", "self-attention"])
def test_a_residual_added_to_a_fused_block_is_added_inside_it(sublayer):
    norm = random_parameters(nn.LayerNorm(8, dtype=ta.float64))
    if sublayer == "feed-forward":
        block = random_parameters(nn.FeedForward(8, 12, generator=ta.Generator(2), dtype=ta.float64))
        output = lambda x: block(norm(x))  # noqa: E731
    else:
        block = random_parameters(nn.MultiHeadAttention(8, 2, generator=ta.Generator(2), dtype=ta.float64))
        output = lambda x: block(norm(x))[0]  # noqa: E731
    x = randn(2, 4, 8)
    alone = output(x)
    total = x + alone
    assert type(total.grad_fn).__name__.startswith("Fused")  # one Function: no separate Add
    assert alone.pending  # the block's output alone was never computed ...
    np.testing.assert_allclose(alone.numpy() + x.numpy(), total.numpy(), rtol=1e-12)  # ... until read, and then it is
    assert_paths_agree(lambda x, *ps: x + output(x), [x, *norm.parameters(), *block.parameters()], [(2, 4, 8)])
    assert_paths_agree(lambda x, y, *ps: output(x) + y, [x, randn(2, 4, 8), *block.parameters()], [(2, 4, 8)])
