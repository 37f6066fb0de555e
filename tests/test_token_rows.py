"""The fused blocks compute only the rows that hold tokens (tinyattn.kernels.sublayer).

Given token rows, a fused block must agree with its composed reference on every token
row and on every gradient of a loss that reads token rows only, pass each padding row
through unchanged, and really skip the padding: its first projection reads one row per
token. A model's training step (forward_batch) gives the same loss and gradients on both
paths, with every positional encoding and with dropout.
"""
import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from tinyattn import backend, kernels, nn
from tinyattn.functional import cross_entropy
from tinyattn.kernels.feed_forward import feed_forward
from tinyattn.tasks import PAD, SequenceTask, token_rows

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(11)
SOURCE_LENGTHS, TARGET_LENGTHS = [5, 2, 3], [4, 1, 2]  # the first row of each has no padding


def randn(*shape):
    return ta.tensor(RNG.standard_normal(shape), device=ta.get_default_device(), requires_grad=True)


def token_mask(lengths, width):
    """(B * width,) bools of the token rows, on the host."""
    return np.array([[position < length for position in range(width)] for length in lengths]).reshape(-1)


def random_parameters(module, seed=0):
    """Parameters away from their initial values (norms' 1 and 0 included), the same for the same seed."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = ta.tensor(rng.standard_normal(p.shape) * 0.5, dtype=p.dtype, device=p.device).data
    return module


def test_token_rows_are_the_flat_indices_of_each_rows_first_positions():
    rows = token_rows([3, 1, 2], 4)
    assert rows.dtype == ta.int64
    assert rows.tolist() == [0, 1, 2, 4, 8, 9]


@pytest.mark.parametrize("layer_class, positional, dropout", [
    (nn.EncoderLayer, None, 0.0), (nn.DecoderLayer, None, 0.0), (nn.DecoderLayer, "rope", 0.0),
    (nn.EncoderLayer, "alibi", 0.0), (nn.DecoderLayer, None, 0.3)], ids=["encoder", "decoder", "decoder-rope",
                                                                          "encoder-alibi", "decoder-dropout"])
def test_a_layer_on_token_rows_agrees_with_the_composed_layer_on_tokens_and_gradients(layer_class, positional, dropout):
    width, memory_width = 5, 5
    x, memory = randn(3, width, 8), randn(3, memory_width, 8)
    x_rows = token_rows(TARGET_LENGTHS if layer_class is nn.DecoderLayer else SOURCE_LENGTHS, width)
    x_tokens = token_mask(TARGET_LENGTHS if layer_class is nn.DecoderLayer else SOURCE_LENGTHS, width)
    memory_rows, memory_tokens = token_rows(SOURCE_LENGTHS, memory_width), token_mask(SOURCE_LENGTHS, memory_width)
    memory_mask = ta.tensor(memory_tokens.reshape(3, 1, 1, memory_width))
    upstream = ta.tensor(RNG.standard_normal((3, width, 8)) * x_tokens.reshape(3, width, 1))  # a loss on the token rows only
    results = {}
    for path in kernels.CHOICES:
        layer = random_parameters(layer_class(8, 2, 12, dropout=dropout, generator=ta.Generator(9), dtype=ta.float64,
                                              positional=positional))
        with kernels.use(path):
            rows = dict(token_rows=x_rows) if path == "fused" else {}
            if layer_class is nn.DecoderLayer:
                out = layer(x, memory, memory_mask=memory_mask, memory_rows=memory_rows if rows else None, **rows)[0]
            else:
                out = layer(x, mask=memory_mask, **rows)[0]
            loss = (out * upstream).sum()
            grads = ta.grad(loss, [x, memory, *layer.parameters()], allow_unused=True)
        results[path] = out.numpy().reshape(-1, 8), [None if g is None else g.numpy() for g in grads]
    (fused_out, fused_grads), (composed_out, composed_grads) = results["fused"], results["composed"]
    np.testing.assert_allclose(fused_out[x_tokens], composed_out[x_tokens], rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(fused_out[~x_tokens], x.numpy().reshape(-1, 8)[~x_tokens])  # padding passes through
    for index, (fused, composed) in enumerate(zip(fused_grads, composed_grads)):
        if composed is None:
            assert fused is None or not np.any(fused), index
        else:
            np.testing.assert_allclose(fused, composed, rtol=1e-9, atol=1e-11, err_msg=f"gradient {index}")


def test_the_fused_blocks_project_one_row_per_token(monkeypatch):
    """Would fail if the rows were ignored: every product's left operand has the token count of rows, not B * T."""
    x = randn(3, 5, 8)
    tokens = int(token_mask(SOURCE_LENGTHS, 5).sum())
    left_rows = []
    handle = backend.add_matmul_hook(lambda a, b, seconds: left_rows.append(a.shape[0]) if a.ndim == 2 and b.ndim == 2 else None)
    try:
        feed_forward(x, randn(12, 8), randn(12), randn(8, 12), randn(8), token_rows=token_rows(SOURCE_LENGTHS, 5)).numpy()
    finally:
        handle.remove()
    assert left_rows == [tokens, tokens]


@pytest.mark.parametrize("model, positional", [("transformer", "learned"), ("transformer", "rope"), ("gpt", "alibi"),
                                               ("gpt", "learned")])
def test_a_training_step_skipping_padding_has_the_composed_loss_and_gradients(model, positional):
    config = Config(model=model, vocab=8, max_len=9, d_model=16, heads=2, layers=2, d_ff=24, positional=positional)
    task = SequenceTask("reverse", config.vocab, config.min_len, config.max_len)
    batch = next(task.batches(16, 3, device=ta.get_default_device()))
    assert int((batch.source == PAD).sum().item()) > 0  # the batch has padding to skip
    results = {}
    for path in kernels.CHOICES:
        net = build_model(config, task.vocab_size)
        with kernels.use(path):
            logits, labels = net.forward_batch(batch)
            loss = cross_entropy(logits, labels, ignore_index=PAD)
            loss.backward()
        results[path] = loss.item(), {name: p.grad.numpy() for name, p in net.named_parameters()}
    assert results["fused"][0] == pytest.approx(results["composed"][0], rel=1e-5)
    for name, grad in results["composed"][1].items():
        np.testing.assert_allclose(results["fused"][1][name], grad, rtol=2e-3, atol=2e-5, err_msg=name)


def test_token_rows_that_are_not_integer_indices_or_too_many_are_refused():
    x = randn(2, 3, 8)
    weights = (randn(12, 8), randn(12), randn(8, 12), randn(8))
    with pytest.raises(TypeError, match="token_rows must be a 1-D integer tensor"):
        feed_forward(x, *weights, token_rows=ta.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="token_rows names 7 rows, but x of shape .* has 6"):
        feed_forward(x, *weights, token_rows=ta.tensor(list(range(7))))
