"""The encoder-decoder and GPT models: shapes, labels, decoding with and without the cache."""
import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from models.gpt import language_model_batch
from tinyattn.tasks import BOS, EOS, PAD, SEP, SequenceTask

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

TASK = SequenceTask("reverse", vocab=6, min_len=1, max_len=6)
CONFIG = dict(d_model=16, heads=2, d_ff=32, dropout=0.0, seed=3, layers=2, max_len=6)


@pytest.fixture(params=["transformer", "gpt"])
def model(request):
    return build_model(Config(**CONFIG, model=request.param), TASK.vocab_size)


def test_language_model_batch_puts_labels_on_target_and_eos_only():
    batch = TASK.make_batch([[4, 5], [6]])
    inputs, labels = language_model_batch(batch)
    assert inputs.tolist() == [[BOS, 4, 5, SEP, 5, 4], [BOS, 6, SEP, 6, PAD, PAD]]
    assert labels.tolist() == [[PAD, PAD, PAD, 5, 4, EOS], [PAD, PAD, 6, EOS, PAD, PAD]]


def test_forward_batch_gives_logits_for_every_label(model):
    batch = next(TASK.batches(5, seed=0))
    logits, labels = model.forward_batch(batch)
    assert logits.shape == labels.shape + (TASK.vocab_size,)
    assert logits.dtype == ta.float32


def test_cached_and_uncached_greedy_decoding_agree(model):
    batch = next(TASK.batches(8, seed=1))
    with_cache, maps = model.greedy_decode(batch.source, 7, need_weights=True)
    without_cache, _ = model.greedy_decode(batch.source, 7, use_cache=False)
    assert with_cache == without_cache
    assert all(len(row) == 7 or row[-1] == EOS for row in with_cache)
    for row, source, attention in zip(with_cache, batch.sources, maps):
        assert attention.shape == (CONFIG["layers"], CONFIG["heads"], len(row), len(source))
        np.testing.assert_array_less(attention.sum(axis=-1), 1.0 + 1e-5)


def test_greedy_decoding_stops_each_row_at_its_eos():
    model = build_model(Config(**CONFIG, model="transformer"), TASK.vocab_size)
    # Make EOS the argmax everywhere except for the first step of row 0, via the output bias.
    model.head.bias.data[...] = 0.0
    model.head.bias.data[EOS] = 100.0
    rows, _ = model.greedy_decode(TASK.make_batch([[4, 5], [6]]).source, 5)
    assert rows == [[EOS], [EOS]]


def test_decoding_past_the_positions_is_a_clear_error(model):
    with pytest.raises(ValueError, match="max_len"):
        model.greedy_decode(TASK.make_batch([[4, 5]]).source, 100)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'lstm'"):
        build_model(Config(**CONFIG, model="lstm"), TASK.vocab_size)


def test_transformer_exposes_cross_attention_weights():
    model = build_model(Config(**CONFIG, model="transformer"), TASK.vocab_size)
    batch = TASK.make_batch([[4, 5, 6], [7, 8]])
    _, weights = model(batch.source, batch.decoder_input, need_weights=True)
    cross = weights["decoder"][0]["cross"].numpy()
    assert cross.shape == (2, CONFIG["heads"], 4, 3)
    assert np.all(cross[1, :, :, 2] == 0.0)  # row 1 has only 2 real source tokens
