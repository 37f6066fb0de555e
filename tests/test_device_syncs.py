"""How often a training step and a decoding step wait for the device: counted on the CuPy stand-in.

Reading a value back from a GPU (a loss, a count, a maximum to decide on) waits for every
kernel queued before it, so the hot paths may read only what the user needs to see.
"""
import pytest

from models.config import Config
from models.training import Run

SMALL = dict(task="reverse", vocab=6, min_len=1, max_len=6, d_model=16, heads=2, layers=1, d_ff=32, batch_size=8)


@pytest.mark.parametrize("model", ["transformer", "gpt", "rnn-attention"])
@pytest.mark.parametrize("kernels", ["fused", "composed"])
def test_a_training_step_reads_the_device_once(sync_counter, model, kernels):
    run = Run(Config(**SMALL, model=model, kernels=kernels, grad_clip=1.0, dropout=0.1))
    run.train_step()  # the first step makes the optimizer's state
    for read_accuracy in (False, True):  # a plain step, and one that shows the progress bar's accuracy too
        before = sync_counter.count
        loss, _, accuracy = run.train_step(read_accuracy=read_accuracy)
        assert sync_counter.count - before == 1, f"read_accuracy={read_accuracy}"
        assert loss > 0 and (accuracy is None) != read_accuracy


# The GPT reads its prompts back once per call, to group rows of equal length (models/gpt.py).
READS_BEFORE_THE_FIRST_STEP = {"transformer": 0, "gpt": 1, "rnn-attention": 0}


@pytest.mark.parametrize("model", sorted(READS_BEFORE_THE_FIRST_STEP))
def test_a_decoding_step_reads_the_device_once(sync_counter, model):
    run = Run(Config(**SMALL, model=model))
    source = run.task.make_batch([[4, 5, 6, 7], [8, 4, 9, 5]]).source
    before = sync_counter.count
    rows, _ = run.model.greedy_decode(source, max_new_tokens=5)
    steps = max(len(row) for row in rows)  # the loop runs until the last row says EOS, or 5 steps
    assert sync_counter.count - before == READS_BEFORE_THE_FIRST_STEP[model] + steps


POSITIONS = {"rope": dict(positional="rope"), "alibi": dict(positional="alibi"),
             "randomized learned": dict(randomized_positions=20), "randomized rope": dict(positional="rope", randomized_positions=20)}


@pytest.mark.parametrize("positions", POSITIONS.values(), ids=POSITIONS.keys())
@pytest.mark.parametrize("model", ["transformer", "gpt"])
def test_positions_add_no_wait_for_the_device(sync_counter, model, positions):
    """Positions are counted on the device or drawn on the host and sent, never read back."""
    run = Run(Config(**SMALL, model=model, **positions))
    run.train_step()
    before = sync_counter.count
    run.train_step()
    assert sync_counter.count - before == 1
    source = run.task.make_batch([[4, 5, 6, 7], [8, 4, 9, 5]]).source
    before = sync_counter.count
    rows, _ = run.model.greedy_decode(source, max_new_tokens=5)
    assert sync_counter.count - before == READS_BEFORE_THE_FIRST_STEP[model] + max(len(row) for row in rows)
