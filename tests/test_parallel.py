"""Data parallelism on threads and in processes: shards' gradients add up to the whole batch's, and really run side by side."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tinyattn as ta
from models import Config, build_model
from models.training import forward_backward
from tinyattn import cpu, kernels, nn, parallel, profiler
from tinyattn.functional import cross_entropy
from tinyattn.parallel import PARALLEL_KINDS, ShardedBackward, default_shards
from tinyattn.tasks import PAD, SequenceTask

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

needs_blas_control = pytest.mark.skipif(not cpu.can_limit_blas_threads(), reason="NumPy's BLAS thread count cannot be set here")
cpu_only = pytest.mark.parametrize("device", ["cpu"], indirect=True)  # overrides the module's two devices
ROOT = Path(__file__).resolve().parent.parent


def batch_of(rows, seed=0):
    task = SequenceTask("reverse", vocab=6, min_len=1, max_len=7)
    return task, task.make_batch(task.sample_sources(np.random.default_rng(seed), rows))


def test_split_keeps_every_row_once_in_order_with_the_padded_length():
    _, batch = batch_of(5)
    parts = batch.split(2)
    assert [len(part) for part in parts] == [2, 3]
    assert sum((part.sources for part in parts), []) == batch.sources
    assert sum((part.targets for part in parts), []) == batch.targets
    for name in ("source", "decoder_input", "labels"):
        joined = np.concatenate([getattr(part, name).numpy() for part in parts])
        np.testing.assert_array_equal(joined, getattr(batch, name).numpy())
        assert {getattr(part, name).device for part in parts} == {getattr(batch, name).device}


def test_split_into_more_parts_than_rows_gives_one_row_each_and_refuses_zero():
    _, batch = batch_of(3)
    assert [len(part) for part in batch.split(5)] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 1 part"):
        batch.split(0)


def linear_loss(model, scale):
    def loss_of(shard):
        x, y = shard
        return ((model(x) - y) ** 2).sum() * scale, threading.current_thread().name, cpu.blas_thread_count()
    return loss_of


def whole_and_sharded_grads(shards):
    rng = np.random.default_rng(1)
    x = ta.tensor(rng.standard_normal((8, 5)), dtype=ta.float64, device=ta.get_default_device())
    y = ta.tensor(rng.standard_normal((8, 3)), dtype=ta.float64, device=ta.get_default_device())
    model = nn.Linear(5, 3, generator=ta.Generator(0), dtype=ta.float64)
    ((model(x) - y) ** 2).sum().backward()
    whole = [p.grad.numpy().copy() for p in model.parameters()]
    model.zero_grad()
    sharded = ShardedBackward(shards)
    parts = [(x[i:i + 8 // shards], y[i:i + 8 // shards]) for i in range(0, 8, 8 // shards)]
    outputs = sharded(linear_loss(model, 1.0), parts, model.parameters())
    return whole, [p.grad.numpy() for p in model.parameters()], outputs, model, sharded, parts


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sharded_gradients_equal_the_whole_batch_gradients(shards):
    whole, sharded, outputs, *_ = whole_and_sharded_grads(shards)
    assert len(outputs) == shards
    for expected, got in zip(whole, sharded):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_shards_run_on_worker_threads_with_blas_held_to_its_share():
    _, _, outputs, *_ = whole_and_sharded_grads(2)
    thread_names = [name for _, name, _ in outputs]
    assert thread_names[0] == threading.current_thread().name
    assert thread_names[1].startswith("tinyattn-shard")
    if cpu.can_limit_blas_threads():
        share = max(1, cpu.core_count() // 2)
        assert [count for _, _, count in outputs] == [share, share]


@cpu_only
@needs_blas_control
@pytest.mark.parametrize("shards", [1, 2])
def test_blas_is_held_to_the_threads_given_with_one_shard_too(shards):
    model = nn.Linear(5, 3, generator=ta.Generator(0))
    parts = [(ta.ones(2, 5), ta.zeros(2, 3))] * shards
    with cpu.blas_threads(2):  # BLAS's own count outside the call: the cores, as NumPy starts it
        outputs = ShardedBackward(shards, blas_threads=1)(linear_loss(model, 1.0), parts, model.parameters())
        assert cpu.blas_thread_count() == 2
    assert [count for _, _, count in outputs] == [1] * shards


@pytest.mark.parametrize("blas_threads", [0, -1, 1.5, True, "2"])
def test_blas_threads_must_be_a_positive_integer(blas_threads):
    with pytest.raises(ValueError, match=f"blas_threads must be a positive integer, got {blas_threads!r}"):
        ShardedBackward(2, blas_threads=blas_threads)
    with pytest.raises(ValueError, match="BLAS threads must be a positive integer"):
        with cpu.blas_threads(blas_threads):
            pass


@cpu_only  # BLAS thread control is NumPy's, on the host
@needs_blas_control
def test_blas_threads_is_restored_after_the_block():
    before = cpu.blas_thread_count()
    with cpu.blas_threads(1):
        assert cpu.blas_thread_count() == 1
    assert cpu.blas_thread_count() == before
    assert cpu.blas_kernels() is None or cpu.blas_kernels().isidentifier()  # an OpenBLAS core name such as Haswell


def test_core_count_is_what_the_process_may_run_on(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert cpu.core_count() == 3
    monkeypatch.delattr(cpu.os, "sched_getaffinity")
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: None)
    assert cpu.core_count() == 1


def test_sharded_gradients_add_to_existing_grads_as_backward_does():
    whole, _, _, model, sharded, parts = whole_and_sharded_grads(2)
    sharded(linear_loss(model, 1.0), parts, model.parameters())  # a second accumulation
    for expected, p in zip(whole, model.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), 2 * expected, rtol=1e-12)


@cpu_only  # a loss on a GPU is not read back here (a sync per shard): the training step drops a non-finite step instead
def test_a_non_finite_shard_loss_leaves_the_gradients_alone():
    _, _, _, model, sharded, parts = whole_and_sharded_grads(2)
    model.zero_grad()
    with np.errstate(all="ignore"):
        outputs = sharded(linear_loss(model, float("inf")), parts, model.parameters())
    assert not np.isfinite(outputs[0][0].item())
    assert all(p.grad is None for p in model.parameters())


def test_worker_shards_see_the_callers_numpy_error_settings():
    _, _, _, model, sharded, parts = whole_and_sharded_grads(2)
    seen = []

    def loss_of(shard):
        seen.append(np.geterr()["over"])
        return linear_loss(model, 1.0)(shard)

    with np.errstate(over="raise"):
        sharded(loss_of, parts, model.parameters())
    assert seen == ["raise", "raise"]


def test_under_the_profiler_shards_take_turns_on_the_calling_thread():
    _, _, _, model, sharded, parts = whole_and_sharded_grads(2)
    with profiler.profile():
        outputs = sharded(linear_loss(model, 1.0), parts, model.parameters())
    assert {name for _, name, _ in outputs} == {threading.current_thread().name}


def test_an_error_in_a_worker_shard_reaches_the_caller_and_the_pool_still_works():
    _, _, _, model, sharded, parts = whole_and_sharded_grads(2)

    def loss_of(shard):
        if threading.current_thread().name.startswith("tinyattn-shard"):
            raise ValueError("bad shard")
        return linear_loss(model, 1.0)(shard)

    with pytest.raises(ValueError, match="bad shard"):
        sharded(loss_of, parts, model.parameters())
    assert len(sharded(linear_loss(model, 1.0), parts, model.parameters())) == 2


def test_bad_shard_counts_are_refused():
    with pytest.raises(ValueError, match="positive integer"):
        ShardedBackward(0)
    _, _, _, model, sharded, parts = whole_and_sharded_grads(2)
    with pytest.raises(ValueError, match="expected 1 to 2 shards, got 4"):
        sharded(linear_loss(model, 1.0), parts + parts, model.parameters())


def test_default_is_one_shard_off_the_cpu():
    assert default_shards("cuda") == 1


@pytest.mark.parametrize("kind", ["transformer", "gpt", "rnn-attention"])
def test_models_sharded_loss_and_gradients_match_the_whole_batch(kind):
    task, batch = batch_of(12, seed=3)
    config = Config(model=kind, d_model=16, heads=2, layers=1, d_ff=32, dropout=0.0, max_len=task.max_len, seed=0)
    model = build_model(config, task.vocab_size)
    logits, labels = model.forward_batch(batch)
    loss = cross_entropy(logits, labels, ignore_index=PAD)
    loss.backward()
    whole = [p.grad.numpy().copy() for p in model.parameters()]
    model.zero_grad()
    scale = 1.0 / batch.num_tokens

    def loss_of(shard):
        shard_logits, shard_labels = model.forward_batch(shard)
        return (cross_entropy(shard_logits, shard_labels, ignore_index=PAD, reduction="sum") * scale,)

    outputs = ShardedBackward(2)(loss_of, batch.split(2), model.parameters())
    assert sum(out[0].item() for out in outputs) == pytest.approx(loss.item(), rel=1e-5)
    for expected, p in zip(whole, model.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


# --- processes -------------------------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc"), reason="worker processes are forked")


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command's name (state, parent pid, ...), or None
    for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid):
    """Whether process `pid` exists and has not ended (a zombie waiting for its parent has)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def ended_soon(pid, seconds=10):
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not running(pid)


def parted_linear(rows=8, seed=1):
    """A float64 Linear model, its data in two parts, and a loss_of kept for the processes' sake (one object)."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((rows, 5)), rng.standard_normal((rows, 3))
    model = nn.Linear(5, 3, generator=ta.Generator(0), dtype=ta.float64)
    parts = [(ta.tensor(x[i:i + rows // 2]), ta.tensor(y[i:i + rows // 2])) for i in (0, rows // 2)]
    caller = os.getpid()

    def loss_of(shard, scale=1.0, fail_in_worker=False):
        if fail_in_worker and os.getpid() != caller:
            raise ValueError("bad shard")
        x_part, y_part = shard
        return ((model(x_part) - y_part) ** 2).sum() * scale, os.getpid(), kernels.selected()
    return model, parts, loss_of


@pytest.fixture
def served():
    """parted_linear after one call in processes: (model, parts, loss_of, the ShardedBackward, its worker's pid)."""
    model, parts, loss_of = parted_linear()
    sharded = ShardedBackward(2, parallel="processes")
    sharded(loss_of, parts, model.parameters())
    yield model, parts, loss_of, sharded, sharded.worker_pids[0]
    sharded.close()


def grads_of(model):
    return [p.grad.numpy().copy() for p in model.parameters()]


@cpu_only
@needs_fork
def test_processes_give_the_bits_threads_give_and_run_in_another_process():
    results = {}
    for kind in PARALLEL_KINDS:
        model, parts, loss_of = parted_linear()
        sharded = ShardedBackward(2, parallel=kind)
        outputs = sharded(loss_of, parts, model.parameters())
        results[kind] = grads_of(model), [out[0].item() for out in outputs], [out[1] for out in outputs]
        sharded.close()
    (thread_grads, thread_losses, thread_pids), (process_grads, process_losses, process_pids) = results["threads"], results["processes"]
    assert all(np.array_equal(a, b) for a, b in zip(thread_grads, process_grads)) and thread_losses == process_losses
    assert thread_pids == [os.getpid()] * 2 and process_pids[0] == os.getpid() != process_pids[1]


@cpu_only
@needs_fork
@pytest.mark.parametrize("kind", ["transformer", "gpt", "rnn-attention"])
def test_models_in_processes_with_dropout_match_threads_bit_for_bit(kind):
    task, batch = batch_of(12, seed=3)
    config = Config(model=kind, d_model=16, heads=2, layers=1, d_ff=32, dropout=0.2, max_len=task.max_len, seed=0)
    results = {}
    for how in PARALLEL_KINDS:
        model = build_model(config, task.vocab_size)
        sharded = ShardedBackward(2, generator=ta.Generator(7), parallel=how)
        for _ in range(2):  # the second step: the workers serve again, and the dropout seeds move on
            model.zero_grad()
            loss, predictions = forward_backward(model, model.parameters(), batch, sharded)
        results[how] = grads_of(model), loss.item(), [(logits.numpy(), labels.numpy()) for logits, labels in predictions]
        assert len(sharded.worker_pids) == (1 if how == "processes" else 0)
        sharded.close()
    threads, processes = results["threads"], results["processes"]
    assert processes[1] == threads[1]
    assert all(np.array_equal(a, b) for a, b in zip(threads[0], processes[0]))
    assert all(np.array_equal(a, b) for pair in zip(threads[2], processes[2]) for a, b in zip(*pair))


@cpu_only
@needs_fork
def test_a_worker_carries_the_kernels_switch_and_serves_call_after_call(served):
    model, parts, loss_of, sharded, pid = served
    with kernels.use("composed"):
        outputs = sharded(loss_of, parts, model.parameters())
    assert [out[2] for out in outputs] == ["composed", "composed"] and sharded.worker_pids == [pid]
    sharded.close()
    assert ended_soon(pid) and sharded.worker_pids == []


@cpu_only
@needs_fork
def test_the_optimizers_update_reaches_the_worker_and_a_replaced_array_forks_anew(served):
    model, parts, loss_of, sharded, pid = served
    weight = model.parameters()[0]
    weight.data -= 0.5  # in place, as optimizers update: the worker reads the new values from the shared memory
    model.zero_grad()
    sharded(loss_of, parts, model.parameters())
    in_place = grads_of(model)
    weight.data = weight.data * 2.0  # a new array (as a loader might bind): the worker could not see it
    model.zero_grad()
    sharded(loss_of, parts, model.parameters())
    assert sharded.worker_pids != [pid] and ended_soon(pid)
    replaced = grads_of(model)
    for values, got in ((weight.data / 2.0, in_place), (weight.data, replaced)):
        reference, reference_parts, reference_loss = parted_linear()
        reference.parameters()[0].data[...] = values
        ShardedBackward(2, parallel="threads")(reference_loss, reference_parts, reference.parameters())
        assert all(np.array_equal(a, b) for a, b in zip(grads_of(reference), got))


@cpu_only
@needs_fork
def test_a_worker_ignores_the_signals_that_stop_a_run(served):
    model, parts, loss_of, sharded, pid = served
    for number in parallel.WORKER_IGNORES:  # Ctrl-C reaches the whole process group; the caller saves, then ends it
        os.kill(pid, number)
    time.sleep(0.1)
    assert running(pid) and len(sharded(loss_of, parts, model.parameters())) == 2


@cpu_only
@needs_fork
def test_a_killed_worker_is_a_clear_error_that_leaves_the_gradients_alone_and_the_next_call_forks_anew(served):
    model, parts, loss_of, sharded, pid = served
    os.kill(pid, signal.SIGKILL)
    assert ended_soon(pid)
    model.zero_grad()
    with pytest.raises(parallel.WorkerError, match=rf"^the worker process of shard 2 \(pid {pid}\) was killed by signal 9 "
                       r"\(SIGKILL\) during a step$"):
        sharded(loss_of, parts, model.parameters())
    assert all(p.grad is None for p in model.parameters()) and sharded.worker_pids == []
    assert len(sharded(loss_of, parts, model.parameters())) == 2 and sharded.worker_pids != [pid]


@cpu_only
@needs_fork
def test_an_error_in_a_worker_process_reaches_the_caller_and_the_worker_still_serves():
    model, parts, loss_of = parted_linear()
    sharded = ShardedBackward(2, parallel="processes")
    with pytest.raises(ValueError, match="bad shard"):
        sharded(loss_of, parts, model.parameters(), 1.0, True)
    (pid,) = sharded.worker_pids
    assert len(sharded(loss_of, parts, model.parameters())) == 2 and sharded.worker_pids == [pid]
    model.zero_grad()
    with np.errstate(all="ignore"):
        outputs = sharded(loss_of, parts, model.parameters(), float("inf"))
    assert not np.isfinite(outputs[1][0].item()) and all(p.grad is None for p in model.parameters())
    sharded.close()


@cpu_only
@needs_fork
def test_the_workers_end_when_the_callers_process_dies():
    script = textwrap.dedent("""
        import os, signal
        from tests.test_parallel import parted_linear
        from tinyattn.parallel import ShardedBackward
        model, parts, loss_of = parted_linear()
        sharded = ShardedBackward(2, parallel="processes")
        sharded(loss_of, parts, model.parameters())
        print(*sharded.worker_pids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert ended_soon(int(done.stdout.split()[0]))


@cpu_only
@needs_fork
def test_under_the_profiler_processes_shards_take_turns_in_the_calling_process():
    model, parts, loss_of = parted_linear()
    sharded = ShardedBackward(2, parallel="processes")
    with profiler.profile():
        outputs = sharded(loss_of, parts, model.parameters())
    assert [out[1] for out in outputs] == [os.getpid()] * 2 and sharded.worker_pids == []


def test_processes_refuse_gpu_tensors_and_unknown_kinds(device):
    with pytest.raises(ValueError, match="parallel must be one of processes, threads, got 'fork'"):
        ShardedBackward(2, parallel="fork")
    if device == "cuda" and hasattr(os, "fork"):
        model = nn.Linear(5, 3, generator=ta.Generator(0))
        parts = [(ta.ones(2, 5), ta.zeros(2, 3))] * 2
        with pytest.raises(ValueError, match="runs shards of CPU tensors only"):
            ShardedBackward(2, parallel="processes")(linear_loss(model, 1.0), parts, model.parameters())
