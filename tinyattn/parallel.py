"""Data parallelism on threads: a batch's shards go forward and backward side by side.

Why it pays on a CPU: NumPy runs every elementwise operation (layer norm, softmax,
ReLU, residual adds) on one core, and at the sizes tinyattn trains that is about half
of a step; only matrix products use BLAS's threads. PyTorch splits the work inside each
operation across the cores. tinyattn splits the batch instead: NumPy releases the GIL
inside its loops, so the shards' array work runs on separate cores at once. Meanwhile
BLAS is held to cores // shards threads, or its threads would fight the shards for the
same cores. The Python parts (building the graph, walking it) still take turns.
BLAS is held to its share with one shard too: OpenBLAS's idle threads spin, and a step
whose BLAS threads outnumber its share of the cores runs 2.4x slower or worse as soon as
another process is busy (docs/performance.md, "Speed under load").

The gradients equal one backward over the whole batch up to rounding: each shard's loss
is its share of the batch loss, and the shards' gradients are summed in shard order, so
a run is reproducible for a given number of shards.
"""
import contextvars
import math
from concurrent.futures import ThreadPoolExecutor, wait

from . import backend, cpu, profiler
from .creation import drawing_from
from .engine import Tensor, grad


def default_shards(device="cpu"):
    """2 on a CPU with at least two cores whose BLAS threads can be limited, else 1."""
    if device != "cpu" or cpu.core_count() < 2 or not cpu.can_limit_blas_threads():
        return 1
    return 2


class ShardedBackward:
    """Runs `loss_of(shard)` for each shard on its own thread and sums the gradients of the
    shards' losses into the parameters' `.grad` (adding to what is there, as backward does).

        sharded = ShardedBackward(2)
        outputs = sharded(loss_of, batch.split(sharded.shards), model.parameters())

    loss_of returns a tuple whose first item is the shard's scalar loss, scaled so that the
    shards' losses add up to the batch's (a sum over the shard divided by the batch's
    count, not the shard's mean); the call returns those tuples in shard order. With one
    shard it is plain `loss.backward()` on the calling thread. While the profiler is on,
    the shards run one after another, so its timings do not overlap. When a shard's loss
    on the host is not finite, nothing is differentiated or accumulated (_worth_differentiating).

    blas_threads: how many threads each shard's matrix products may use (default: the
    process's cores shared among the shards), held for the call, with one shard too.

    generator: with several shards, each shard draws its dropout masks and randomized positions
    from its own generator, seeded each call from this one (threads taking turns at one
    generator would make a run unrepeatable), so such a run is repeatable for a given number
    of shards.
    """

    def __init__(self, shards, generator=None, blas_threads=None):
        for name, value in (("shards", shards), ("blas_threads", blas_threads if blas_threads is not None else 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.shards, self.generator = shards, generator
        self.blas_threads_per_shard = blas_threads or max(1, cpu.core_count() // shards)
        self._pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="tinyattn-shard") if shards > 1 else None

    @property
    def threads(self):
        """The threads a call runs on, BLAS's included: the shards times each one's BLAS threads."""
        return self.shards * self.blas_threads_per_shard

    def __call__(self, loss_of, shards, params):
        if not 1 <= len(shards) <= self.shards:
            raise ValueError(f"expected 1 to {self.shards} shards, got {len(shards)}")
        with cpu.blas_threads(self.blas_threads_per_shard):
            return self._run_shards(loss_of, shards, params)

    def _run_shards(self, loss_of, shards, params):
        if len(shards) == 1:
            outputs = loss_of(shards[0])
            if _worth_differentiating(outputs[0]):
                outputs[0].backward()
            return [outputs]
        params = [param for param in params if param.requires_grad]
        own_generators = ([backend.generator(int(seed)) for seed in self.generator.integers(0, 2 ** 63, size=len(shards))]
                          if self.generator is not None else [None] * len(shards))

        def run(shard, generator):
            with drawing_from(generator):
                outputs = loss_of(shard)
            return outputs, grad(outputs[0], params, allow_unused=True) if _worth_differentiating(outputs[0]) else None

        if profiler.is_active():
            results = [run(shard, generator) for shard, generator in zip(shards, own_generators)]
        else:
            # Each shard runs in a copy of the caller's context, so settings such as NumPy's errstate carry over.
            pending = [self._pool.submit(contextvars.copy_context().run, run, shard, generator)
                       for shard, generator in zip(shards[1:], own_generators[1:])]
            try:
                first = run(shards[0], own_generators[0])
            finally:  # never leave a shard running past this call, even on an error or Ctrl-C
                wait(pending)
            results = [first] + [job.result() for job in pending]
        if all(grads is not None for _, grads in results):
            self._accumulate(params, [grads for _, grads in results])
        return [outputs for outputs, _ in results]

    @staticmethod
    def _accumulate(params, shard_grads):
        for index, param in enumerate(params):
            parts = [grads[index].data for grads in shard_grads if grads[index] is not None]
            if not parts:
                continue
            total = parts[0] + parts[1] if len(parts) > 1 else parts[0].copy()  # a fresh array: shards' grads may be shared
            for part in parts[2:]:
                total += part
            if param.grad is None:
                param.grad = Tensor._from_array(total)
            else:
                param.grad.data += total


def _worth_differentiating(loss):
    """False for a loss that is not finite on the host: the step is lost anyway, and its
    overflowing backward would only spill warnings. A loss on a GPU is not read here, which
    would wait for the device; the caller reads it once and drops such a step."""
    return backend.device_of(loss.data) != "cpu" or math.isfinite(loss.item())
