"""The toy tasks: token layout, seeded streams, held-out separation, bad settings, the lookup task."""
import pytest

from tinyattn.tasks import BOS, EOS, FIRST_SYMBOL, PAD, SequenceTask, describe, lookup_vocab, pad

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


def test_layout_of_a_reverse_batch(device):
    task = SequenceTask("reverse", vocab=5, min_len=2, max_len=3)
    batch = task.make_batch([[4, 5, 6], [7, 8]])
    assert {t.device for t in (batch.source, batch.decoder_input, batch.labels)} == {device}  # the default device
    assert batch.source.tolist() == [[4, 5, 6], [7, 8, PAD]]
    assert batch.decoder_input.tolist() == [[BOS, 6, 5, 4], [BOS, 8, 7, PAD]]
    assert batch.labels.tolist() == [[6, 5, 4, EOS], [8, 7, EOS, PAD]]
    assert batch.num_tokens == 4 + 3
    assert task.vocab_size == 4 + 5


@pytest.mark.parametrize("name, expected", [("copy", [6, 4, 5]), ("reverse", [5, 4, 6]), ("sort", [4, 5, 6])])
def test_each_task_transforms_the_source(name, expected):
    assert SequenceTask(name).target_for([6, 4, 5]) == expected


def test_streams_are_seeded_resumable_and_within_settings():
    task = SequenceTask("copy", vocab=3, min_len=2, max_len=5)
    first, again = task.batches(16, seed=4), task.batches(16, seed=4)
    a, b = next(first), next(again)
    assert a.sources == b.sources
    assert all(2 <= len(row) <= 5 and all(FIRST_SYMBOL <= s < FIRST_SYMBOL + 3 for s in row) for row in a.sources)
    saved = first.state()
    expected = next(first).sources
    again.set_state(saved)
    assert next(again).sources == expected
    assert next(task.batches(16, seed=5)).sources != a.sources


def test_held_out_set_comes_from_a_different_stream_than_training():
    task = SequenceTask("reverse", vocab=10, min_len=8, max_len=16)
    held_out = [tuple(row) for batch in task.eval_set(256, seed=0, batch_size=100) for row in batch.sources]
    assert len(held_out) == 256 and [len(b) for b in task.eval_set(256, 0, batch_size=100)] == [100, 100, 56]
    training = {tuple(row) for _, batch in zip(range(20), task.batches(64, seed=0)) for row in batch.sources}
    assert not training & set(held_out)  # long random sequences: any overlap would mean a shared stream


@pytest.mark.parametrize("options, message", [
    (dict(name="shuffle"), "unknown task 'shuffle'"),
    (dict(vocab=1), "vocab must be at least 2"),
    (dict(min_len=5, max_len=3), r"min_len \(5\) must not exceed max_len \(3\)"),
    (dict(min_len=0), "min_len must be at least 1"),
])
def test_bad_settings_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SequenceTask(**options)


def test_bad_source_symbols_and_batch_size():
    task = SequenceTask("copy", vocab=3)
    with pytest.raises(ValueError, match=r"\[4, 7\), got 9"):
        task.make_batch([[4, 9]])
    with pytest.raises(ValueError, match="batch_size must be positive"):
        task.batches(0, seed=0)


def test_pad_and_describe(device):
    assert pad([[5], [6, 7]]).tolist() == [[5, PAD], [6, 7]] and pad([[5]]).device == device
    assert describe([BOS, 4, 13, EOS]) == "<bos> 0 9 <eos>"


def test_lookup_sources_are_a_query_then_pairs_with_distinct_keys_and_the_target_is_its_value():
    task = SequenceTask("lookup", vocab=14, min_len=1, max_len=16)
    keys, values = set(range(FIRST_SYMBOL, FIRST_SYMBOL + 7)), set(range(FIRST_SYMBOL + 7, FIRST_SYMBOL + 14))
    batch = next(task.batches(256, seed=3))
    seen_pairs = set()
    for source, target in zip(batch.sources, batch.targets):
        query, *pairs = source
        stored = dict(zip(pairs[::2], pairs[1::2]))
        assert len(source) % 2 == 1 and 3 <= len(source) <= 15
        assert set(stored) <= keys and set(stored.values()) <= values  # keys and values from disjoint halves
        assert len(stored) == len(pairs) // 2 and len(set(stored.values())) == len(stored)  # distinct keys, distinct values
        assert query in stored and target == [stored[query]] == task.target_for(source)
        seen_pairs.add(len(stored))
    assert seen_pairs == set(range(1, 8))  # the number of pairs varies over the whole range


def test_lookup_lengths_follow_min_len_and_max_len():
    task = SequenceTask("lookup", vocab=20, min_len=6, max_len=9)
    assert {len(row) for row in next(task.batches(200, seed=0)).sources} == {7, 9}
    assert lookup_vocab(16) == 14 and lookup_vocab(3) == 2


@pytest.mark.parametrize("options, message", [
    (dict(max_len=2), "max_len must be at least 3 for the lookup task"),
    (dict(min_len=4, max_len=4), r"min_len \(4\) leaves no lookup source length up to max_len \(4\)"),
    (dict(vocab=10, max_len=16), "vocab must be at least 14 for the lookup task with max_len 16: up to 7 distinct keys"),
])
def test_lookup_settings_that_cannot_draw_sources_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SequenceTask("lookup", **{"vocab": 14, **options})


@pytest.mark.parametrize("source, message", [
    ([4, 4, 11, 5], r"an odd length of at least 3\), got length 4"),
    ([4, 4, 5], r"keys \(symbols 0..6\) alternating with values \(symbols 7..13\)"),
    ([4, 4, 11, 4, 12], "keys must be distinct"),
    ([6, 4, 11, 5, 12], r"query \(its first symbol, 2\) must be one of its keys"),
])
def test_a_malformed_lookup_source_is_refused_with_what_is_wrong(source, message):
    task = SequenceTask("lookup", vocab=14)
    with pytest.raises(ValueError, match=message):
        task.make_batch([source])
    assert task.make_batch([[5, 4, 11, 5, 12]]).labels.tolist() == [[12, EOS]]
