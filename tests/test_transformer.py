"""Positional encodings, feed-forward, pre-LN encoder/decoder layers and stacks."""
import math

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import nn

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(1)
D_MODEL, HEADS, D_FF = 8, 2, 16


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def randn(*shape, grad=False):
    return on_device(RNG.standard_normal(shape), requires_grad=grad)


def layer_kwargs(seed=0):
    return dict(generator=ta.Generator(seed), dtype=ta.float64)


def test_sinusoidal_encoding_matches_the_formula():
    encoding = nn.SinusoidalPositionalEncoding(6, max_len=10, dtype=ta.float64)
    added = encoding(ta.zeros(1, 4, 6, dtype=ta.float64), offset=3).numpy()[0]
    for row, pos in enumerate(range(3, 7)):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert added[row, 2 * i] == pytest.approx(math.sin(angle), abs=1e-12)
            assert added[row, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-12)
    assert encoding.parameters() == []


def test_positional_encodings_reject_positions_past_max_len():
    for encoding in (nn.SinusoidalPositionalEncoding(4, max_len=5), nn.LearnedPositionalEncoding(5, 4)):
        with pytest.raises(ValueError, match="exceed.*max_len 5"):
            encoding(ta.zeros(1, 3, 4), offset=3)


def test_learned_encoding_adds_its_rows_and_is_trained():
    encoding = nn.LearnedPositionalEncoding(6, 4, **layer_kwargs())
    x = randn(2, 3, 4)
    np.testing.assert_array_equal(encoding(x, offset=2).numpy(), x.numpy() + encoding.weight.numpy()[2:5])
    assert ta.gradcheck(lambda x, w: encoding(x, offset=1), [randn(2, 3, 4, grad=True), encoding.weight])


def test_feed_forward_matches_hand_computation():
    ff = nn.FeedForward(D_MODEL, D_FF, **layer_kwargs())
    x = RNG.standard_normal((2, 3, D_MODEL))
    w1, b1, w2, b2 = (p.numpy() for p in ff.parameters())
    expected = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(ff(on_device(x)).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        nn.FeedForward(4, 8, activation="swish")


def test_encoder_layer_is_pre_ln_residual():
    layer = nn.EncoderLayer(D_MODEL, HEADS, D_FF, **layer_kwargs())
    x = randn(2, 4, D_MODEL)
    mask = on_device(np.array([[True] * 4, [True, True, False, False]]))[:, None, None, :]
    out, weights = layer(x, mask=mask, need_weights=True)
    middle = x + layer.self_attn(layer.norm1(x), mask=mask)[0]
    expected = middle + layer.feed_forward(layer.norm2(middle))
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-12)
    assert weights.shape == (2, HEADS, 4, 4)
    assert np.all(weights.numpy()[1, :, :, 2:] == 0.0)


def test_decoder_layer_is_causal_self_then_cross_then_feed_forward():
    layer = nn.DecoderLayer(D_MODEL, HEADS, D_FF, **layer_kwargs())
    x, memory = randn(2, 3, D_MODEL), randn(2, 5, D_MODEL)
    out, weights = layer(x, memory, need_weights=True)
    h = x + layer.self_attn(layer.norm1(x), causal=True)[0]
    h = h + layer.cross_attn(layer.cross_norm(h), context=memory)[0]
    expected = h + layer.feed_forward(layer.norm2(h))
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-12)
    assert weights["self"].shape == (2, HEADS, 3, 3) and weights["cross"].shape == (2, HEADS, 3, 5)
    assert np.all(np.triu(weights["self"].numpy()[0, 0], k=1) == 0.0)


def test_decoder_output_at_a_position_ignores_later_positions():
    decoder = nn.Decoder(2, D_MODEL, HEADS, D_FF, **layer_kwargs())
    x, memory = randn(1, 4, D_MODEL), randn(1, 3, D_MODEL)
    changed = x.numpy().copy()
    changed[0, 3] += RNG.standard_normal(D_MODEL)  # not a constant shift, which LayerNorm would erase
    a, _ = decoder(x, memory)
    b, _ = decoder(on_device(changed), memory)
    np.testing.assert_allclose(a.numpy()[0, :3], b.numpy()[0, :3], rtol=1e-12)
    assert not np.allclose(a.numpy()[0, 3], b.numpy()[0, 3])


def test_stacks_end_with_layer_norm_and_return_weights_per_layer():
    encoder = nn.Encoder(2, D_MODEL, HEADS, D_FF, **layer_kwargs())
    out, weights = encoder(randn(2, 3, D_MODEL), need_weights=True)
    np.testing.assert_allclose(out.numpy().mean(axis=-1), 0.0, atol=1e-12)  # final LayerNorm with weight 1, bias 0
    assert len(weights) == 2 and weights[0].shape == (2, HEADS, 3, 3)
    assert encoder(randn(2, 3, D_MODEL))[1] is None
    with pytest.raises(ValueError, match="num_layers must be positive"):
        nn.Encoder(0, D_MODEL, HEADS, D_FF)


def test_cached_decoding_equals_uncached_decoding():
    decoder = nn.Decoder(2, D_MODEL, HEADS, D_FF, **layer_kwargs())
    x, memory = randn(2, 6, D_MODEL), randn(2, 4, D_MODEL)
    mask = on_device(np.array([[True] * 4, [True, True, True, False]]))[:, None, None, :]
    with ta.no_grad():
        full, full_weights = decoder(x, memory, memory_mask=mask, need_weights=True)
        cache = decoder.new_cache()
        steps = [decoder(x[:, t:t + 1], memory, memory_mask=mask, need_weights=True, cache=cache) for t in range(6)]
    np.testing.assert_allclose(ta.concatenate([s[0] for s in steps], axis=1).numpy(), full.numpy(), rtol=1e-10, atol=1e-12)
    for layer in range(2):
        np.testing.assert_allclose(steps[-1][1][layer]["cross"].numpy()[:, :, 0],
                                   full_weights[layer]["cross"].numpy()[:, :, -1], rtol=1e-10)


def test_one_layer_encoder_decoder_gradcheck():
    encoder = nn.Encoder(1, D_MODEL, HEADS, D_FF, **layer_kwargs(1))
    decoder = nn.Decoder(1, D_MODEL, HEADS, D_FF, **layer_kwargs(2))
    source, target = randn(2, 4, D_MODEL, grad=True), randn(2, 3, D_MODEL, grad=True)
    mask = on_device(np.array([[True] * 4, [True, True, False, False]]))[:, None, None, :]
    params = encoder.parameters() + decoder.parameters()

    def encode_decode(source, target, *params):
        memory, _ = encoder(source, mask=mask)
        return decoder(target, memory, memory_mask=mask)[0]

    assert ta.gradcheck(encode_decode, [source, target, *params], fast=True)


def test_gelu_layers_and_dropout_train_eval():
    layer = nn.EncoderLayer(D_MODEL, HEADS, D_FF, dropout=0.5, activation="gelu", **layer_kwargs())
    x = randn(2, 3, D_MODEL)
    layer.eval()
    np.testing.assert_array_equal(layer(x)[0].numpy(), layer(x)[0].numpy())
    layer.train()
    assert not np.allclose(layer(x)[0].numpy(), layer(x)[0].numpy())
