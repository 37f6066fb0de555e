"""Data parallelism: a batch's shards go forward and backward side by side, on threads or
in forked processes.

Why it pays on a CPU: NumPy runs every elementwise operation (layer norm, softmax,
ReLU, residual adds) on one core, and at the sizes tinyattn trains that is about half
of a step; only matrix products use BLAS's threads. PyTorch splits the work inside each
operation across the cores. tinyattn splits the batch instead, and each shard's array
work runs on its own core. Meanwhile BLAS is held to cores // shards threads, or its
threads would fight the shards for the same cores. BLAS is held to its share with one
shard too: OpenBLAS's idle threads spin, and a step whose BLAS threads outnumber its
share of the cores runs 2.4x slower or worse as soon as another process is busy
(docs/performance.md, "Speed under load").

Threads or processes: NumPy releases the GIL inside its loops, so threads' array work
overlaps, but the Python parts of a step (building the graph, walking it, dispatching
each op: about half of a small step) take turns at the GIL. Forked worker processes
each have their own interpreter, so those overlap too. A worker is a copy of this
process made at the first split call: it holds the same model, whose parameters were
moved into memory both processes share (so the optimizer's in-place update reaches it),
and writes its gradients into a second shared block, which the caller adds up. Only the
shard, a seed and the outputs cross the pipe between them.

The gradients equal one backward over the whole batch up to rounding: each shard's loss
is its share of the batch loss, and the shards' gradients are summed in shard order, so
a run is reproducible for a given number of shards, and threads and processes give the
same bits.
"""
import contextvars
import math
import os
import signal
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from multiprocessing.connection import Pipe

from . import backend, cpu, kernels, profiler
from .creation import drawing_from
from .engine import Tensor, grad

PARALLEL_KINDS = ("processes", "threads")
# A worker ignores the signals that stop a training run: Ctrl-C reaches the whole process group,
# and the caller, which finishes its step and saves, is the one to end the worker (by closing its pipe).
WORKER_IGNORES = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# The caller's ends of every live worker's pipe. A newly forked worker closes its copies, or a
# worker forked earlier would not see its pipe close when the caller's process ends.
_callers_ends = weakref.WeakSet()


def default_shards(device="cpu"):
    """2 on a CPU with at least two cores whose BLAS threads can be limited, else 1."""
    if device != "cpu" or cpu.core_count() < 2 or not cpu.can_limit_blas_threads():
        return 1
    return 2


def default_parallel(device="cpu"):
    """How shards run side by side by default: processes on a Linux CPU (fork is safe there), else threads."""
    return "processes" if device == "cpu" and sys.platform.startswith("linux") and hasattr(os, "fork") else "threads"


class WorkerError(RuntimeError):
    """A worker process died during a step (killed, say, or out of memory); the caller's
    parameters are as they were before the step."""


class ShardedBackward:
    """Runs `loss_of(shard, *args)` for each shard side by side and sums the gradients of
    the shards' losses into the parameters' `.grad` (adding to what is there, as backward does).

        sharded = ShardedBackward(2)
        outputs = sharded(loss_of, batch.split(sharded.shards), model.parameters())

    loss_of returns a tuple whose first item is the shard's scalar loss, scaled so that the
    shards' losses add up to the batch's (a sum over the shard divided by the batch's
    count, not the shard's mean); the call returns those tuples in shard order. With one
    shard it is plain `loss.backward()` on the calling thread. While the profiler is on,
    the shards run one after another on the calling thread, so its timings do not overlap
    and it sees them all. When a shard's loss on the host is not finite, nothing is
    differentiated or accumulated (_worth_differentiating).

    parallel: "threads" (the shards after the first on a pool of threads) or "processes"
    (each in a worker process forked at the first call that splits; CPU tensors only). A
    worker keeps that call's loss_of and params: a later call with a loss_of that is not
    == to it, other params, or a parameter whose array was replaced forks the workers anew.
    A worker is a copy of the process as it was at that call (modules' train or eval mode,
    buffers and parameters that need no gradient included); only the values of the
    parameters it differentiates follow the caller, through shared memory. A
    process's shard returns its outputs as tensors without a graph, and `args` are
    pickled to it, so they should be small (a scale, a flag). `close()` ends the workers
    (so does dropping the object, and the end of the program).

    blas_threads: how many threads each shard's matrix products may use (default: the
    process's cores shared among the shards), held for the call, with one shard too.

    generator: with several shards, each shard draws its dropout masks and randomized positions
    from its own generator, seeded each call from this one (threads taking turns at one
    generator would make a run unrepeatable), so such a run is repeatable for a given number
    of shards.
    """

    def __init__(self, shards, generator=None, blas_threads=None, parallel="threads"):
        for name, value in (("shards", shards), ("blas_threads", blas_threads if blas_threads is not None else 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if parallel not in PARALLEL_KINDS:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_KINDS)}, got {parallel!r}")
        if parallel == "processes" and not hasattr(os, "fork"):
            raise ValueError("parallel 'processes' forks worker processes, and this platform cannot fork; use 'threads'")
        self.shards, self.generator, self.parallel = shards, generator, parallel
        self.blas_threads_per_shard = blas_threads or max(1, cpu.core_count() // shards)
        self._pool = (ThreadPoolExecutor(shards - 1, thread_name_prefix="tinyattn-shard")
                      if shards > 1 and parallel == "threads" else None)
        self._workers = None  # the _Workers of the last call that split, in processes

    @property
    def threads(self):
        """The threads a call runs on, BLAS's included: the shards times each one's BLAS threads."""
        return self.shards * self.blas_threads_per_shard

    def __call__(self, loss_of, shards, params, *args):
        if not 1 <= len(shards) <= self.shards:
            raise ValueError(f"expected 1 to {self.shards} shards, got {len(shards)}")
        with cpu.blas_threads(self.blas_threads_per_shard):
            return self._run_shards(loss_of, shards, params, args)

    @property
    def worker_pids(self):
        """The process ids of the workers running now (none before the first call that splits in processes)."""
        return list(self._workers.pids) if self._workers is not None and self._workers.running else []

    def close(self):
        """End the worker processes, if any (a later call forks new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _run_shards(self, loss_of, shards, params, args):
        if len(shards) == 1:
            outputs = loss_of(shards[0], *args)
            if _worth_differentiating(outputs[0]):
                outputs[0].backward()
            return [outputs]
        params = [param for param in params if param.requires_grad]
        seeds = ([int(seed) for seed in self.generator.integers(0, 2 ** 63, size=len(shards))]
                 if self.generator is not None else [None] * len(shards))
        if profiler.is_active():
            results = [_shard_loss_and_grads(loss_of, shard, args, params, seed) for shard, seed in zip(shards, seeds)]
        elif self.parallel == "processes":
            results = self._workers_for(loss_of, params).run(shards, seeds, args)
        else:
            # Each shard runs in a copy of the caller's context, so settings such as NumPy's errstate carry over.
            pending = [self._pool.submit(contextvars.copy_context().run, _shard_loss_and_grads, loss_of, shard, args, params, seed)
                       for shard, seed in zip(shards[1:], seeds[1:])]
            try:
                first = _shard_loss_and_grads(loss_of, shards[0], args, params, seeds[0])
            finally:  # never leave a shard running past this call, even on an error or Ctrl-C
                wait(pending)
            results = [first] + [job.result() for job in pending]
        if all(grads is not None for _, grads in results):
            _accumulate(params, [grads for _, grads in results])
        return [outputs for outputs, _ in results]

    def _workers_for(self, loss_of, params):
        if self._workers is None or not self._workers.serve(loss_of, params):
            self.close()
            self._workers = _Workers(self.shards - 1, loss_of, params, self.blas_threads_per_shard)
        return self._workers


def _shard_loss_and_grads(loss_of, shard, args, params, seed):
    """One shard's outputs, and the gradients of its loss for `params` as arrays (None for a
    parameter the loss does not use), or None for a loss not worth differentiating."""
    with drawing_from(backend.generator(seed) if seed is not None else None):
        outputs = loss_of(shard, *args)
    if not _worth_differentiating(outputs[0]):
        return outputs, None
    return outputs, [g.data if g is not None else None for g in grad(outputs[0], params, allow_unused=True)]


def _accumulate(params, shard_grads):
    for index, param in enumerate(params):
        parts = [grads[index] for grads in shard_grads if grads[index] is not None]
        if not parts:
            continue
        # a fresh array: shards' grads may be shared, and a worker's are overwritten by its next step
        total = parts[0] + parts[1] if len(parts) > 1 else parts[0].copy()
        for part in parts[2:]:
            total += part
        if param.grad is None:
            param.grad = Tensor._from_array(total)
        else:
            param.grad.data += total


class _Workers:
    """The forked processes that run a ShardedBackward's shards after the first, one each.

    Before forking, the parameters' arrays move into shared memory (each parameter's
    .data becomes a view of it), and each worker gets a shared block for its gradients. Per
    call a worker receives (shard, seed, args, the kernels switch), runs the shard, writes its
    gradients and sends back its outputs, or the error it raised. It exits when its pipe
    closes: at close(), or when the caller's process ends, however it ends.
    """

    def __init__(self, count, loss_of, params, blas_threads):
        if any(param.device != "cpu" for param in params):
            raise ValueError("parallel 'processes' runs shards of CPU tensors only; "
                             "a GPU's shards run on threads (parallel='threads')")
        self.loss_of, self.params = loss_of, list(params)
        self.arrays = backend.shared_host_arrays([param.data for param in self.params])
        for param, shared in zip(self.params, self.arrays):
            shared[...] = param.data
            param.data = shared
        self.grads = [backend.shared_host_arrays(self.arrays) for _ in range(count)]
        self.connections, self.pids = [], []
        for grads in self.grads:
            ours, theirs = Pipe()
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORES)  # none lands before the worker ignores them
            try:
                pid = os.fork()
                if pid == 0:  # the worker: never returns into the caller's code
                    code = 1
                    try:
                        for end in [ours, *_callers_ends]:
                            end.close()
                        for number in WORKER_IGNORES:
                            signal.signal(number, signal.SIG_IGN)
                        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                        code = _serve(theirs, loss_of, self.params, grads, blas_threads)
                    finally:
                        os._exit(code)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            theirs.close()
            _callers_ends.add(ours)
            self.connections.append(ours)
            self.pids.append(pid)
        self._finalizer = weakref.finalize(self, _stop, self.connections, self.pids)

    @property
    def running(self):
        """False once closed: by close(), or by a failed exchange."""
        return self._finalizer.alive

    def serve(self, loss_of, params):
        """Whether these workers are running, for this loss_of on these parameters with the arrays they share."""
        return (self.running and loss_of == self.loss_of and len(params) == len(self.params)
                and all(param is ours and param.data is array for param, ours, array in zip(params, self.params, self.arrays)))

    def run(self, shards, seeds, args):
        """(outputs, gradient arrays or None) of each shard: the first here, the others in the workers."""
        try:
            for index, (shard, seed) in enumerate(zip(shards[1:], seeds[1:])):
                self._exchange(index, "send", (shard, seed, args, kernels.selected()))
            try:
                first = _shard_loss_and_grads(self.loss_of, shards[0], args, self.params, seeds[0])
            finally:  # every sent shard is answered, even when the first fails
                replies = [self._exchange(index, "recv") for index in range(len(shards) - 1)]
        except BaseException:
            self.close()  # an interrupted exchange leaves the pipes out of step: the next call forks anew
            raise
        results = [first]
        for index, (kind, *content) in enumerate(replies):
            if kind == "error":
                raise content[0]
            outputs, used = content
            grads = None if used is None else [g if use else None for g, use in zip(self.grads[index], used)]
            results.append((tuple(Tensor._from_array(item) if backend.is_array(item) else item for item in outputs), grads))
        return results

    def _exchange(self, index, way, *message):
        """connection.send(message) or .recv() with worker `index`; a closed pipe is a WorkerError."""
        try:
            return getattr(self.connections[index], way)(*message)
        except (EOFError, OSError):
            raise WorkerError(f"the worker process of shard {index + 2} (pid {self.pids[index]}) "
                              f"{_how_it_ended(self.pids[index])} during a step") from None

    def close(self):
        self._finalizer()


def _serve(connection, loss_of, params, grads, blas_threads):
    """A worker's loop: a shard in, its gradients into `grads` and its outputs out, until the pipe closes."""
    with cpu.blas_threads(blas_threads):
        while True:
            try:
                request = connection.recv()
            except (EOFError, OSError):
                return 0
            if request is None:
                return 0
            shard, seed, args, kernel_choice = request
            try:
                with kernels.use(kernel_choice):
                    outputs, shard_grads = _shard_loss_and_grads(loss_of, shard, args, params, seed)
                if shard_grads is not None:
                    for shared, part in zip(grads, shard_grads):
                        if part is not None:
                            shared[...] = part
                reply = ("done", tuple(item.data if isinstance(item, Tensor) else item for item in outputs),
                         None if shard_grads is None else [part is not None for part in shard_grads])
            except Exception as error:  # the caller raises it
                reply = ("error", error)
            try:
                connection.send(reply)
            except (EOFError, OSError):
                return 0
            except Exception as error:  # an error or an output that does not pickle
                connection.send(("error", RuntimeError(f"a worker shard's reply could not be sent back: {error!r}")))


def _stop(connections, pids):
    for connection in connections:
        try:
            connection.send(None)  # the worker's loop ends
        except OSError:  # it has died already
            pass
        connection.close()
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # reaped already (_how_it_ended)
            pass


def _how_it_ended(pid):
    """'was killed by signal 9 (SIGKILL)' or 'exited with code 1', for a worker whose pipe closed."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "ended"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = f" ({signal.Signals(number).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {number}{name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _worth_differentiating(loss):
    """False for a loss that is not finite on the host: the step is lost anyway, and its
    overflowing backward would only spill warnings. A loss on a GPU is not read here, which
    would wait for the device; the caller reads it once and drops such a step."""
    return backend.device_of(loss.data) != "cpu" or math.isfinite(loss.item())
