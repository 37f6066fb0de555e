"""GRU cell, additive attention and the RNN encoder-decoders: values, gradients, masks, decoding."""
import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from tinyattn import kernels, nn
from tinyattn.tasks import SequenceTask

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(11)


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def randn(*shape, grad=True):
    return on_device(RNG.standard_normal(shape), requires_grad=grad)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def test_gru_cell_follows_the_gru_equations(kernel_path):
    cell = nn.GRUCell(3, 4, generator=ta.Generator(0), dtype=ta.float64)
    x, h = RNG.standard_normal((2, 3)), RNG.standard_normal((2, 4))
    w_ih, w_hh, b_ih, b_hh = (p.numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))
    gx, gh = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    r, z = sigmoid(gx[:, :4] + gh[:, :4]), sigmoid(gx[:, 4:8] + gh[:, 4:8])
    n = np.tanh(gx[:, 8:] + r * gh[:, 8:])
    np.testing.assert_allclose(cell(on_device(x), on_device(h)).numpy(), (1 - z) * n + z * h, rtol=1e-12)


def test_gru_cell_gradcheck(kernel_path):
    cell = nn.GRUCell(3, 4, generator=ta.Generator(1), dtype=ta.float64)
    assert ta.gradcheck(lambda x, h, *ps: cell(x, h), [randn(2, 3), randn(2, 4), *cell.parameters()])


def test_composed_gru_cell_differentiates_twice_and_fused_refuses():
    cell = nn.GRUCell(2, 3, generator=ta.Generator(2), dtype=ta.float64)
    with kernels.use("composed"):
        assert ta.gradgradcheck(lambda x, h: cell(x, h), [randn(2, 2), randn(2, 3)], fast=True)
    x = randn(2, 2)
    with pytest.raises(RuntimeError, match=r"first-order.*kernels.use\('composed'\)"):
        ta.grad(cell(x, randn(2, 3)).sum(), x, create_graph=True)


MASK = np.array([[True, True, False, False], [True, True, True, True]])  # on the host; on_device(MASK) in each test


def test_additive_attention_values_and_gradcheck(kernel_path):
    attention = nn.AdditiveAttention(3, 5, 4, generator=ta.Generator(3), dtype=ta.float64)
    query, keys, mask = randn(2, 3), randn(2, 4, 5), on_device(MASK)
    context, weights = attention(query, keys, mask=mask)
    w_q, w_k, b_k, v = (p.numpy() for p in (attention.query_proj.weight, attention.key_proj.weight,
                                             attention.key_proj.bias, attention.score))
    energy = np.tanh(keys.numpy() @ w_k.T + b_k + (query.numpy() @ w_q.T)[:, None, :])
    scores = np.where(MASK, energy @ v, -np.inf)
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert np.all(weights.numpy()[0, 2:] == 0.0)
    np.testing.assert_allclose(context.numpy(), np.einsum("bs,bsk->bk", expected, keys.numpy()), rtol=1e-12)
    assert ta.gradcheck(lambda q, k, *ps: attention(q, k, mask=mask)[0], [query, keys, *attention.parameters()])


def test_fully_masked_query_gets_zero_context():
    attention = nn.AdditiveAttention(3, 5, 4, generator=ta.Generator(7), dtype=ta.float64)
    context, weights = attention(randn(1, 3), randn(1, 2, 5), mask=on_device(np.array([[False, False]])))
    assert np.all(context.numpy() == 0.0) and np.all(weights.numpy() == 0.0)


def test_run_gru_carries_the_state_over_padding():
    cell = nn.GRUCell(2, 3, generator=ta.Generator(8), dtype=ta.float64)
    inputs = [randn(2, 2, grad=False) for _ in range(4)]
    mask = on_device(MASK)
    states, last = nn.run_gru(cell, inputs, mask)
    assert states.shape == (2, 4, 3)
    short, _ = nn.run_gru(cell, [x[:1] for x in inputs[:2]])
    np.testing.assert_allclose(last.numpy()[0], short.numpy()[0, -1], rtol=1e-12)
    np.testing.assert_array_equal(states.numpy()[0, 3], states.numpy()[0, 1])


def test_run_gru_in_reverse_reads_each_row_from_its_last_real_token():
    cell = nn.GRUCell(2, 3, generator=ta.Generator(9), dtype=ta.float64)
    inputs = [randn(2, 2, grad=False) for _ in range(4)]
    states, first = nn.run_gru(cell, inputs, on_device(MASK), reverse=True)
    for row, length in enumerate(MASK.sum(axis=1)):
        read_backwards, _ = nn.run_gru(cell, [x[row:row + 1] for x in inputs[:length][::-1]])
        np.testing.assert_allclose(states.numpy()[row, :length], read_backwards.numpy()[0, ::-1], rtol=1e-12)
        np.testing.assert_allclose(first.numpy()[row], read_backwards.numpy()[0, -1], rtol=1e-12)
    assert np.all(states.numpy()[0, 2:] == 0.0)  # row 0's padding, read first, leaves the zero initial state


def bidirectional_cells(input_size, hidden_size, seed):
    return [nn.GRUCell(input_size, hidden_size, generator=ta.Generator(seed + i), dtype=ta.float64) for i in range(2)]


def test_bidirectional_gru_gradcheck(kernel_path):
    """Annotations and final states of both directions, padding included, in float64 on each kernels path."""
    cell, cell_reverse = bidirectional_cells(2, 3, seed=12)
    mask = on_device(MASK)
    inputs = [randn(2, 2) for _ in range(4)]
    params = [*cell.parameters(), *cell_reverse.parameters()]

    def annotations_and_finals(*tensors):
        annotations, finals = nn.run_bidirectional_gru(cell, cell_reverse, list(tensors[:4]), mask)
        return ta.concatenate([annotations.reshape(2, -1), finals], axis=-1)

    assert ta.gradcheck(annotations_and_finals, [*inputs, *params])


def test_bidirectional_gru_matches_torch_on_padded_rows():
    torch = pytest.importorskip("torch")
    cell, cell_reverse = bidirectional_cells(3, 4, seed=14)
    reference = torch.nn.GRU(3, 4, batch_first=True, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        for suffix, ours in (("", cell), ("_reverse", cell_reverse)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{name}_l0{suffix}").copy_(torch.from_numpy(getattr(ours, name).numpy()))
    source = RNG.standard_normal((2, 4, 3))
    lengths = MASK.sum(axis=1)
    annotations, finals = nn.run_bidirectional_gru(cell, cell_reverse, [on_device(source[:, t]) for t in range(4)], on_device(MASK))
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(source), torch.from_numpy(lengths), batch_first=True,
                                                     enforce_sorted=False)
    with torch.no_grad():
        output, final = reference(packed)
    output, _ = torch.nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=4)
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(annotations.numpy()[row, :length], output.numpy()[row, :length], rtol=1e-10)
    np.testing.assert_allclose(finals.numpy(), torch.cat([final[0], final[1]], dim=-1).numpy(), rtol=1e-10)


TASK = SequenceTask("reverse", vocab=5, min_len=1, max_len=5)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("name", ["rnn", "rnn-attention"])
def test_rnn_models_train_shapes_and_decode(name, bidirectional):
    model = build_model(Config(model=name, d_model=12, heads=4, layers=1, d_ff=8, dropout=0.0, seed=0, max_len=5,
                               bidirectional=bidirectional), TASK.vocab_size)
    batch = next(TASK.batches(6, seed=0))
    logits, labels = model.forward_batch(batch)
    assert logits.shape == labels.shape + (TASK.vocab_size,)
    rows, maps = model.greedy_decode(batch.source, 6, need_weights=True)
    assert rows == model.greedy_decode(batch.source, 6, use_cache=False)[0]
    if name == "rnn":
        assert maps is None
    else:
        for row, source, attention in zip(rows, batch.sources, maps):
            assert attention.shape == (1, 1, len(row), len(source))
            np.testing.assert_allclose(attention.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["rnn", "rnn-attention"])
def test_gradcheck_of_a_whole_tiny_bidirectional_model(name):
    model = build_model(Config(model=name, d_model=4, heads=1, layers=1, d_ff=4, dropout=0.0, seed=1, max_len=3),
                        TASK.vocab_size)
    assert model.encoder_reverse is not None and model.bridge is not None
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    batch = TASK.make_batch([[4, 5, 6], [7, 8]])
    params = model.parameters()
    assert ta.gradcheck(lambda *ps: model(batch.source, batch.decoder_input), params, fast=True)
