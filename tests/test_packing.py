"""Packed sequences (tinyattn.packing): a padded batch's token rows without the padding.

Packing and unpacking are ops with first and second derivatives. On packed rows a layer
must agree with the same layer on the padded batch at every token row and on every
gradient of a loss that reads token rows only, on both kernel paths, and the fused
blocks must really skip the padding: each projection reads one row per token. A model's
training step (forward_batch, packed) gives the same loss and gradients on both paths,
with every positional encoding and with dropout.
"""
import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from tinyattn import backend, kernels, nn
from tinyattn.functional import cross_entropy
from tinyattn.kernels.attention import AttentionProjections, multi_head_attention
from tinyattn.packing import Packing
from tinyattn.tasks import PAD, SequenceTask

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


def test_a_packing_holds_the_flat_indices_of_each_rows_first_positions():
    packing = Packing.of_lengths([3, 1, 2], 4)
    assert packing.rows.dtype == ta.int64
    assert packing.rows.tolist() == [0, 1, 2, 4, 8, 9]
    assert (packing.batch, packing.length, packing.tokens) == (3, 4, 6)


def test_a_batch_without_padding_packs_to_every_row():
    packing = Packing.of_lengths([4, 4], 4)
    assert not packing.has_padding and Packing.of_lengths([4, 3], 4).has_padding
    layer, x = nn.EncoderLayer(8, 2, 12, dtype=ta.float64), randn(2, 4, 8)
    np.testing.assert_allclose(layer(packing.pack(x), packing=packing)[0].numpy(),
                               layer(x)[0].numpy().reshape(8, 8), rtol=1e-12, atol=1e-12)


def test_pack_takes_the_token_rows_and_unpack_puts_them_back_with_zeros():
    packing = Packing.of_lengths([3, 1, 2], 4)
    x = randn(3, 4, 2)
    packed = packing.pack(x)
    tokens = token_mask([3, 1, 2], 4)
    np.testing.assert_array_equal(packed.numpy(), x.numpy().reshape(-1, 2)[tokens])
    padded = packing.unpack(packed).numpy().reshape(-1, 2)
    np.testing.assert_array_equal(padded[tokens], packed.numpy())
    assert not padded[~tokens].any()


def test_packing_and_unpacking_have_first_and_second_derivatives():
    packing = Packing.of_lengths([3, 1, 2], 4)
    assert ta.gradcheck(lambda x: packing.pack(x) ** 2, [randn(3, 4, 2)])
    assert ta.gradgradcheck(lambda x: packing.pack(x) ** 2, [randn(3, 4, 2)])
    assert ta.gradcheck(lambda x: packing.unpack(x) ** 2, [randn(6, 2)])
    assert ta.gradgradcheck(lambda x: packing.unpack(x) ** 2, [randn(6, 2)])


LAYERS = [(nn.EncoderLayer, None), (nn.DecoderLayer, None), (nn.DecoderLayer, "rope"), (nn.EncoderLayer, "alibi")]
LAYER_IDS = ["encoder", "decoder", "decoder-rope", "encoder-alibi"]


def packed_and_reference(layer_class, positional, dropout, path, reference_packed):
    """A layer's token rows and gradients packed on `path`, and those of the composed reference:
    the same layer on the padded batch, or packed too (reference_packed: dropout draws its masks
    in the shape of what it drops, so only two packed runs draw the same ones)."""
    width = memory_width = 5
    lengths = TARGET_LENGTHS if layer_class is nn.DecoderLayer else SOURCE_LENGTHS
    packing, memory_packing = Packing.of_lengths(lengths, width), Packing.of_lengths(SOURCE_LENGTHS, memory_width)
    x_tokens = token_mask(lengths, width)
    x, memory = randn(3, width, 8), randn(3, memory_width, 8)
    memory_mask = ta.tensor(token_mask(SOURCE_LENGTHS, memory_width).reshape(3, 1, 1, memory_width))
    upstream = randn(int(x_tokens.sum()), 8)  # a loss on the token rows only
    results = {}
    for packed, kind in ((True, path), (reference_packed, "composed")):
        layer = random_parameters(layer_class(8, 2, 12, dropout=dropout, generator=ta.Generator(9), dtype=ta.float64,
                                              positional=positional))
        with kernels.use(kind):
            layer_input = packing.pack(x) if packed else x
            rows = dict(packing=packing) if packed else {}
            if layer_class is nn.DecoderLayer:
                memory_rows = dict(memory_packing=memory_packing) if packed else {}
                out = layer(layer_input, memory_packing.pack(memory) if packed else memory, memory_mask=memory_mask,
                            **rows, **memory_rows)[0]
            else:
                out = layer(layer_input, mask=memory_mask, **rows)[0]
            token_out = out if packed else packing.pack(out)
            grads = ta.grad((token_out * upstream).sum(), [x, memory, *layer.parameters()], allow_unused=True)
        results[kind, packed] = token_out.numpy(), [None if g is None else g.numpy() for g in grads]
    return results[path, True], results["composed", reference_packed]


def assert_agree(tested, reference):
    (packed_out, packed_grads), (padded_out, padded_grads) = tested, reference
    np.testing.assert_allclose(packed_out, padded_out, rtol=1e-9, atol=1e-11)
    for index, (packed_grad, padded_grad) in enumerate(zip(packed_grads, padded_grads)):
        if padded_grad is None:
            assert packed_grad is None or not np.any(packed_grad), index
        else:
            np.testing.assert_allclose(packed_grad, padded_grad, rtol=1e-9, atol=1e-11, err_msg=f"gradient {index}")


@pytest.mark.parametrize("layer_class, positional", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("path", kernels.CHOICES)
def test_a_layer_on_packed_rows_agrees_with_the_layer_on_the_padded_batch(layer_class, positional, path):
    assert_agree(*packed_and_reference(layer_class, positional, 0.0, path, reference_packed=False))


@pytest.mark.parametrize("layer_class, positional", LAYERS, ids=LAYER_IDS)
def test_a_fused_layer_with_dropout_on_packed_rows_agrees_with_the_composed_one(layer_class, positional):
    assert_agree(*packed_and_reference(layer_class, positional, 0.3, "fused", reference_packed=True))


def test_the_fused_blocks_project_one_row_per_token():
    """Would fail if padding were computed: every 2-D product's left operand has one row per token."""
    packing = Packing.of_lengths(SOURCE_LENGTHS, 5)
    layer = nn.EncoderLayer(8, 2, 12)
    x = packing.pack(ta.randn(3, 5, 8, requires_grad=True))
    left_rows = []
    handle = backend.add_matmul_hook(lambda a, b, seconds: left_rows.append(a.shape[0]) if a.ndim == 2 and b.ndim == 2 else None)
    try:
        layer(x, packing=packing)[0].sum().backward()
    finally:
        handle.remove()
    # forward: q/k/v, out, two feed-forward products; backward: their input gradients (the weight
    # gradients' left operands are transposed, (features, tokens))
    products_on_rows = [rows for rows in left_rows if rows not in (8, 12, 24)]
    assert products_on_rows and set(products_on_rows) == {packing.tokens}


@pytest.mark.parametrize("model, positional", [("transformer", "learned"), ("transformer", "rope"), ("gpt", "alibi"),
                                               ("gpt", "learned")])
def test_a_packed_training_step_has_the_same_loss_and_gradients_on_both_paths(model, positional):
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
    assert logits.shape == (int((labels != PAD).sum().item()) if model == "transformer" else labels.shape[0], task.vocab_size)
    assert results["fused"][0] == pytest.approx(results["composed"][0], rel=1e-5)
    for name, grad in results["composed"][1].items():
        np.testing.assert_allclose(results["fused"][1][name], grad, rtol=2e-3, atol=2e-5, err_msg=name)


def test_a_packed_step_has_the_loss_of_the_padded_model():
    """The packed step computes what the model computes on the padded batch, at the real labels."""
    config = Config(vocab=8, max_len=9, d_model=16, heads=2, layers=2, d_ff=24)
    task = SequenceTask("reverse", config.vocab, config.min_len, config.max_len)
    batch = next(task.batches(16, 3, device=ta.get_default_device()))
    net = build_model(config, task.vocab_size)
    logits, labels = net.forward_batch(batch)
    padded_logits = net(batch.source, batch.decoder_input)[0]
    assert cross_entropy(logits, labels, ignore_index=PAD).item() == pytest.approx(
        cross_entropy(padded_logits, batch.labels, ignore_index=PAD).item(), rel=1e-6)


def test_packings_that_are_not_integer_indices_or_too_many_or_misfit_are_refused():
    with pytest.raises(TypeError, match="a Packing's rows must be a 1-D integer tensor"):
        Packing(2, 3, ta.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="a Packing of 7 rows does not fit a batch of 2 x 3 positions"):
        Packing(2, 3, ta.tensor(list(range(7))))
    with pytest.raises(ValueError, match=r"sequence lengths must be in 1..3, got \[4, 1\]"):
        Packing.of_lengths([4, 1], 3)
    packing = Packing.of_lengths([3, 1], 3)
    with pytest.raises(ValueError, match=r"pack: a padded input must be \(batch=2, length=3, ...\), got \(2, 4, 8\)"):
        packing.pack(randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"unpack: a packed input needs one row per token \(4\), got shape \(5, 8\)"):
        packing.unpack(randn(5, 8))
    attention = nn.MultiHeadAttention(8, 2)
    projections = AttentionProjections.of(attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
    with pytest.raises(ValueError, match=r"expects a packed input of shape \(tokens=4, 8\) for Packing\(batch=2, length=3, tokens=4\), got \(2, 3, 8\)"):
        multi_head_attention(randn(2, 3, 8), projections, 2, packing=packing)
    with pytest.raises(ValueError, match="a key/value cache decodes padded"):
        with ta.no_grad():
            multi_head_attention(randn(4, 8), projections, 2, packing=packing, cache={})
