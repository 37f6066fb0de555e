"""Positional encodings: RoPE and ALiBi inside attention on both kernel paths, positions given or counted,
the key/value cache with each, randomized positions, and what a model without positions cannot see."""
import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from models.config import POSITIONAL
from models.training import Run
from tinyattn import kernels, nn
from tinyattn.kernels.attention import rotate
from tinyattn.nn.positions import alibi_slopes
from tinyattn.tasks import SequenceTask

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(16)
IN_ATTENTION = ["rope", "alibi"]


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def randn(*shape, grad=True):
    return on_device(RNG.standard_normal(shape), requires_grad=grad)


def random_parameters(module):
    """Parameters away from their initial values, so that every term matters."""
    for p in module.parameters():
        p.data[...] = ta.tensor(RNG.standard_normal(p.shape) * 0.5, dtype=p.dtype, device=p.device).data
    return module


def attention(positional, seed=3):
    return random_parameters(nn.MultiHeadAttention(8, 2, generator=ta.Generator(seed), dtype=ta.float64,
                                                   positional=positional))


def sorted_positions(rows, length, top=40):
    """Distinct sorted positions below `top` for each row, as a device tensor (rows, length)."""
    return on_device(np.sort(np.stack([RNG.choice(top, size=length, replace=False) for _ in range(rows)]), axis=1))


# --- RoPE and ALiBi against straightforward references ------------------------------------------------

def test_rotate_turns_each_pair_of_halves_and_turns_back():
    x = RNG.standard_normal((2, 3, 6))
    angles = RNG.standard_normal((2, 3, 3))
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    turned = rotate(x, cos, sin)
    first, second = x[..., :3], x[..., 3:]  # pair i is (i, i + 3)
    np.testing.assert_allclose(turned[..., :3], first * np.cos(angles) - second * np.sin(angles), rtol=1e-12)
    np.testing.assert_allclose(turned[..., 3:], first * np.sin(angles) + second * np.cos(angles), rtol=1e-12)
    np.testing.assert_allclose(rotate(turned, cos, -sin), x, rtol=1e-12, atol=1e-15)
    as_tensor = rotate(on_device(x), on_device(cos), on_device(sin))  # the composed path runs the same definition
    np.testing.assert_allclose(as_tensor.numpy(), turned, rtol=1e-12)


def test_rope_angles_are_position_times_frequency():
    rope = nn.RotaryPositionalEncoding(8, dtype=ta.float64)
    cos, sin = rope.turns(on_device(np.array([[0, 3, 10]])).data)
    assert cos.shape == (1, 1, 3, 8)
    frequencies = 10000.0 ** (-np.arange(4) * 2 / 8)
    expected = np.array([0, 3, 10])[:, None] * frequencies
    np.testing.assert_allclose(ta.tensor(sin).numpy()[0, 0], np.sin(np.concatenate([expected, expected], -1)), rtol=1e-12)
    np.testing.assert_allclose(ta.tensor(cos).numpy()[0, 0, 0], 1.0)


def test_alibi_slopes_and_bias_follow_the_paper():
    assert alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625]
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]  # 4's, then every other of 8's
    bias = ta.tensor(nn.ALiBiPositionalBias(2, dtype=ta.float64).bias(on_device(np.array([[0, 1, 2]])).data,
                                                                     on_device(np.array([[0, 1, 2, 5]])).data)).numpy()
    distance = np.abs(np.array([0, 1, 2])[:, None] - np.array([0, 1, 2, 5])[None, :])
    np.testing.assert_allclose(bias[0, 0], -distance / 16)
    np.testing.assert_allclose(bias[0, 1], -distance / 256)


@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_attention_with_positions_inside_depends_on_their_differences_alone(positional):
    """Shifting every position by 7 changes nothing: what RoPE and ALiBi see is i - j. Absolute
    positions added to the input would change the output."""
    layer = attention(positional)
    x = randn(2, 5, 8, grad=False)
    positions = sorted_positions(2, 5)
    near, _ = layer(x, causal=True, positions=positions)
    far, _ = layer(x, causal=True, positions=positions + 7)
    counted, _ = layer(x, causal=True)
    np.testing.assert_allclose(near.numpy(), far.numpy(), rtol=1e-9, atol=1e-12)
    assert not np.allclose(near.numpy(), counted.numpy())  # other gaps between the positions: another output


@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_positions_inside_attention_match_a_numpy_reference(positional):
    layer = attention(positional)
    x = RNG.standard_normal((1, 4, 8))
    out, weights = layer(on_device(x), causal=True, need_weights=True)

    def project(linear):
        return (x @ linear.weight.numpy().T + linear.bias.numpy()).reshape(1, 4, 2, 4).transpose(0, 2, 1, 3)

    q, k, v = project(layer.q_proj), project(layer.k_proj), project(layer.v_proj)
    position = np.arange(4)
    if positional == "rope":  # each pair (i, i + 2) of a head turned by position * 10000^(-i/2)
        angles = position[:, None] * 10000.0 ** (-np.arange(2) / 2)
        turn = np.concatenate([np.cos(angles), np.cos(angles)], -1), np.concatenate([-np.sin(angles), np.sin(angles)], -1)
        q, k = (a * turn[0] + np.concatenate([a[..., 2:], a[..., :2]], -1) * turn[1] for a in (q, k))
    scores = q @ k.swapaxes(-1, -2) / 2.0
    if positional == "alibi":
        scores = scores - np.array([0.0625, 0.00390625])[:, None, None] * np.abs(position[:, None] - position[None, :])
    scores = np.where(np.tril(np.ones((4, 4), dtype=bool)), scores, -np.inf)
    expected_weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected_weights /= expected_weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights.numpy(), expected_weights, rtol=1e-10, atol=1e-14)
    heads = (expected_weights @ v).transpose(0, 2, 1, 3).reshape(1, 4, 8)
    np.testing.assert_allclose(out.numpy(), heads @ layer.out_proj.weight.numpy().T + layer.out_proj.bias.numpy(), rtol=1e-10)


# --- gradient checks and the two paths ----------------------------------------------------------------

PADDING = np.array([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
CASES = {"causal self-attention": dict(cross=False, causal=True, mask=None),
         "encoder self-attention with padding": dict(cross=False, causal=False, mask=PADDING[..., :4]),
         "cross-attention with padding": dict(cross=True, causal=False, mask=PADDING)}


def run_case(layer, case, positions=None, context_positions=None):
    mask = None if case["mask"] is None else on_device(case["mask"])

    def run(x, context, *params):
        return layer(x, context=context if case["cross"] else None, mask=mask, causal=case["causal"], need_weights=True,
                     positions=positions, context_positions=context_positions)
    return run


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("given", [False, True], ids=["counted", "given positions"])
@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_composed_attention_with_positions_passes_gradcheck_and_gradgradcheck(positional, given, case):
    layer = attention(positional)
    x, context = randn(2, 4, 8), randn(2, 5, 8)
    run = run_case(layer, case, *((sorted_positions(2, 4), sorted_positions(2, 5)) if given else ()))
    inputs = [x, context, *layer.parameters()]
    with kernels.use("composed"):
        assert ta.gradcheck(lambda *a: run(*a)[0], inputs, fast=True)
        assert ta.gradgradcheck(lambda x: run(x, context)[0], [x], fast=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_fused_and_composed_attention_with_positions_agree_and_the_fused_one_passes_gradcheck(positional, case):
    layer = attention(positional)
    x, context = randn(2, 4, 8), randn(2, 5, 8)
    run = run_case(layer, case, sorted_positions(2, 4), sorted_positions(2, 5))
    inputs = [x, context, *layer.parameters()]
    upstreams = [on_device(RNG.standard_normal((2, 4, 8))), on_device(RNG.standard_normal((2, 2, 4, 5 if case["cross"] else 4)))]
    results = {}
    for path in kernels.CHOICES:
        with kernels.use(path):
            out, weights = run(*inputs)
            grads = ta.grad((out * upstreams[0]).sum() + (weights * upstreams[1]).sum(), inputs, allow_unused=True)
        results[path] = [out.numpy(), weights.numpy()] + [None if g is None else g.numpy() for g in grads]
    for index, (fused, composed) in enumerate(zip(results["fused"], results["composed"])):
        assert (fused is None) == (composed is None), index
        if fused is not None:
            np.testing.assert_allclose(fused, composed, rtol=1e-10, atol=1e-12, err_msg=f"output or gradient {index}")
    assert ta.gradcheck(lambda *a: run(*a)[0], inputs, fast=True)


@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_whole_layers_with_positions_agree_on_both_paths(positional):
    layer = random_parameters(nn.DecoderLayer(8, 2, 12, generator=ta.Generator(9), dtype=ta.float64, positional=positional))
    x, memory = randn(2, 4, 8), randn(2, 5, 8)
    mask = on_device(PADDING)
    results = {}
    for path in kernels.CHOICES:
        with kernels.use(path):
            out, _ = layer(x, memory, memory_mask=mask)
            results[path] = [out.numpy()] + [g.numpy() for g in ta.grad(out.sum(), [x, memory, *layer.parameters()])]
    for fused, composed in zip(results["fused"], results["composed"]):
        np.testing.assert_allclose(fused, composed, rtol=1e-9, atol=1e-11)


# --- the key/value cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("given", [False, True], ids=["counted", "given positions"])
@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_the_self_attention_cache_matches_the_full_causal_pass(positional, given, kernel_path):
    layer = attention(positional)
    x = randn(2, 5, 8, grad=False)
    positions = sorted_positions(2, 5) if given else None
    full, full_weights = layer(x, causal=True, need_weights=True, positions=positions)
    cache = {}
    with ta.no_grad():
        steps = [layer(x[:, t:t + 1], causal=True, need_weights=True, cache=cache,
                       positions=None if positions is None else positions[:, t:t + 1]) for t in range(5)]
    np.testing.assert_allclose(ta.concatenate([s[0] for s in steps], axis=1).numpy(), full.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(steps[-1][1].numpy()[:, :, 0], full_weights.numpy()[:, :, -1], rtol=1e-10)
    assert cache["positions"].shape == (2 if given else 1, 5)


@pytest.mark.parametrize("positional", IN_ATTENTION)
def test_a_cached_decoder_with_positions_equals_the_uncached_one(positional, kernel_path):
    decoder = random_parameters(nn.Decoder(2, 8, 2, 16, generator=ta.Generator(4), dtype=ta.float64, positional=positional))
    x, memory = randn(2, 6, 8, grad=False), randn(2, 4, 8, grad=False)
    mask = on_device(np.array([[True] * 4, [True, True, True, False]]))[:, None, None, :]
    with ta.no_grad():
        full, _ = decoder(x, memory, memory_mask=mask)
        cache = decoder.new_cache()
        steps = [decoder(x[:, t:t + 1], memory, memory_mask=mask, cache=cache)[0] for t in range(6)]
    np.testing.assert_allclose(ta.concatenate(steps, axis=1).numpy(), full.numpy(), rtol=1e-10, atol=1e-12)


MODEL = dict(vocab=6, max_len=6, d_model=16, heads=2, layers=2, d_ff=32)
TASK = SequenceTask("reverse", vocab=6, min_len=1, max_len=6)


@pytest.mark.parametrize("randomized", [None, 40], ids=["counted", "randomized"])
@pytest.mark.parametrize("positional", POSITIONAL)
@pytest.mark.parametrize("model", ["transformer", "gpt"])
def test_cached_and_uncached_greedy_decoding_agree_for_every_encoding(model, positional, randomized):
    if randomized and positional == "none":
        pytest.skip("no positions to randomize")
    run = Run(Config(model=model, positional=positional, randomized_positions=randomized, seed=2, steps=20, warmup=2,
                     batch_size=16, lr=1e-2, threads=1, **MODEL))
    for _ in range(20):  # a little training, so that the answers depend on the input
        run.train_step()
    batch = next(TASK.batches(8, seed=1))
    with_cache, cached_maps = run.model.greedy_decode(batch.source, 7, need_weights=True)
    without_cache, maps = run.model.greedy_decode(batch.source, 7, use_cache=False, need_weights=True)
    assert with_cache == without_cache
    assert len({tuple(row) for row in with_cache}) > 1  # not one answer for every input
    for cached, uncached in zip(cached_maps, maps):
        np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-5)


# --- randomized positions ----------------------------------------------------------------------------------

def test_randomized_positions_are_sorted_distinct_subsets_of_the_range():
    drawn = nn.randomized_positions([3, 5, 1], 12, ta.Generator(0), width=6).numpy()
    assert drawn.shape == (3, 6)
    for row, length in zip(drawn, [3, 5, 1]):
        real = row[:length]
        assert list(real) == sorted(set(real)) and 0 <= real.min() and real.max() < 12
        assert set(row[length:]) <= {real[-1]}  # padding repeats the last real position
    again = nn.randomized_positions([3, 5, 1], 12, ta.Generator(0), width=6).numpy()
    np.testing.assert_array_equal(drawn, again)
    spread = nn.randomized_positions([4] * 200, 12, ta.Generator(1)).numpy()
    assert set(spread.ravel()) == set(range(12))  # every position of the range is met in training
    with pytest.raises(ValueError, match="cannot draw 13 positions without repeats from 12"):
        nn.randomized_positions([13], 12, ta.Generator(0))


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_added_encodings_take_the_rows_of_given_positions(kind):
    if kind == "sinusoidal":
        encoding = nn.SinusoidalPositionalEncoding(4, max_len=12, dtype=ta.float64)
        table = encoding.table.numpy()
    else:
        encoding = nn.LearnedPositionalEncoding(12, 4, generator=ta.Generator(0), dtype=ta.float64)
        table = encoding.weight.numpy()
    x = randn(2, 3, 4, grad=False)
    positions = on_device(np.array([[0, 4, 11], [2, 3, 9]]))
    np.testing.assert_allclose(encoding(x, positions=positions).numpy(), x.numpy() + table[positions.numpy()], rtol=1e-12)
    if ta.get_default_device() == "cpu":  # a GPU's positions are checked where they are drawn, not read back here
        with pytest.raises(ValueError, match="position 12 exceeds the positional encoding's max_len 12"):
            encoding(x, positions=positions + 1)


def test_learned_positions_train_only_the_rows_drawn():
    encoding = nn.LearnedPositionalEncoding(12, 4, generator=ta.Generator(0), dtype=ta.float64)
    encoding(randn(2, 3, 4, grad=False), positions=on_device(np.array([[0, 4, 11]]))).sum().backward()
    trained = np.abs(encoding.weight.grad.numpy()).sum(axis=1) > 0
    assert list(np.flatnonzero(trained)) == [0, 4, 11]


@pytest.mark.parametrize("model", ["transformer", "gpt"])
def test_a_training_step_with_randomized_positions_draws_new_ones_each_batch(model):
    net = build_model(Config(model=model, positional="learned", randomized_positions=60, **MODEL), TASK.vocab_size)
    batch = next(TASK.batches(8, seed=1))
    first, _ = net.forward_batch(batch)
    second, _ = net.forward_batch(batch)
    assert not np.allclose(first.numpy(), second.numpy())  # the same batch at other positions
    counted = build_model(Config(model=model, positional="learned", **MODEL), TASK.vocab_size)
    np.testing.assert_array_equal(counted.forward_batch(batch)[0].numpy(), counted.forward_batch(batch)[0].numpy())


# --- no positions ------------------------------------------------------------------------------------------

def test_an_encoder_without_positions_reads_a_bag_of_symbols():
    """NoPE in the encoder-decoder: permuting the source permutes the encoder's states, so the decoder
    sees the same set whatever the order, and cannot copy or reverse it."""
    net = build_model(Config(model="transformer", positional="none", **MODEL), TASK.vocab_size)
    source = TASK.make_batch([[4, 5, 6, 7, 8]]).source
    order = [3, 0, 4, 2, 1]
    memory, _, _ = net.encode(source)
    shuffled, _, _ = net.encode(source[:, order])
    np.testing.assert_allclose(shuffled.numpy(), memory.numpy()[:, order], rtol=1e-5, atol=1e-6)
    decoder_input = TASK.make_batch([[4, 5, 6, 7, 8]]).decoder_input
    np.testing.assert_allclose(net(source, decoder_input)[0].numpy(), net(source[:, order], decoder_input)[0].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_a_causal_model_without_positions_still_sees_order():
    """NoPE in the decoder-only model: each token sees only those before it, so order shows."""
    net = build_model(Config(model="gpt", positional="none", **MODEL), TASK.vocab_size)
    tokens = on_device(np.array([[1, 4, 5, 6, 3]]))
    swapped = on_device(np.array([[1, 5, 4, 6, 3]]))
    assert not np.allclose(net(tokens)[0].numpy()[:, -1], net(swapped)[0].numpy()[:, -1])
