"""Speed under load: the training step with one core busy against idle, tinyattn and the PyTorch twin.

    python benchmarks/contention.py [--rounds 8 --block 8 --pause 0.25 --skip-torch]

Another program often shares the machine. One busy process (a Python loop, started
once) takes a core; between blocks of steps it is paused (SIGSTOP) and resumed
(SIGCONT), so idle and busy blocks alternate through the run and a slow moment of the
shared machine hits both. The sides, each timed as train.py takes its step on
pre-generated batches:
    tinyattn --threads 1 / --threads 2   the reference transformer as train.py runs it, its two
                                         parts in two processes (the default on Linux) or threads
    torch 1 thread / 2 threads           its PyTorch twin, torch.set_num_threads(1 | 2)
    rnn-attention                        the GRU model, as the default runs it
and, for contrast, the one-thread steps with BLAS left at NumPy's own thread count (the
cores), as tinyattn ran them before it held BLAS to the step's share. Each block starts
after a --pause of sleep (so the last block's BLAS or OpenMP workers stop spinning) and
one untimed step; the order of the sides and of idle and busy flips every round.
Reports each side's median step idle and busy and their ratio (goal: at most 2 with
one of two cores busy). Writes benchmarks/results/contention.json.
"""
import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

import common
from tinyattn import cpu
from tinyattn.parallel import ShardedBackward
from models.training import sharded_backward_for, threads_per_step

DISTINCT_BATCHES = 16
GRU = common.REFERENCE.replace(model="rnn-attention")


@contextlib.contextmanager
def busy_process():
    """A process that keeps one core busy, stopped at first; yields (busy, idle) switches."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield (lambda: os.kill(process.pid, signal.SIGCONT)), (lambda: os.kill(process.pid, signal.SIGSTOP))
    finally:
        process.kill()
        process.wait()


def tinyattn_side(config, blas_threads=None):
    """A step of train.py's model for `config` on its threads (sharded_backward_for), or on
    one shard with BLAS at `blas_threads` threads; returns a function of the step number."""
    run = common.train_run(config)
    batches = [next(run.stream) for _ in range(DISTINCT_BATCHES)]
    sharded = sharded_backward_for(config) if blas_threads is None else ShardedBackward(1, blas_threads=blas_threads)
    return lambda i: common.timed_train_step(run.model, run.optimizer, batches[i % DISTINCT_BATCHES], sharded)[0]


def torch_side(torch, threads):
    """The PyTorch twin of the reference transformer stepping on `threads` intra-op threads."""
    from step_time import torch_step
    from twin import Seq2SeqTwin, batch_tensors
    run = common.train_run(common.REFERENCE)
    tensors = [batch_tensors(next(run.stream)) for _ in range(DISTINCT_BATCHES)]
    twin = Seq2SeqTwin.from_tinyattn(run.model)
    optimizer = torch.optim.Adam(twin.parameters(), lr=common.REFERENCE.lr)

    def step(i):
        torch.set_num_threads(threads)  # process-wide: the other torch side may have changed it
        return torch_step(twin, optimizer, tensors[i % DISTINCT_BATCHES])[0]
    return step


def sides_to_time(torch):
    cores = cpu.core_count()
    sides = {"tinyattn --threads 1": tinyattn_side(common.REFERENCE.replace(threads=1)),
             f"tinyattn --threads 1, BLAS on {cores} threads (before)": tinyattn_side(common.REFERENCE.replace(threads=1), cores),
             "tinyattn --threads 2 --parallel processes": tinyattn_side(common.REFERENCE.replace(threads=2, parallel="processes")),
             "tinyattn --threads 2 --parallel threads": tinyattn_side(common.REFERENCE.replace(threads=2, parallel="threads")),
             f"rnn-attention (default: {threads_per_step(sharded_backward_for(GRU))})": tinyattn_side(GRU),
             f"rnn-attention, BLAS on {cores} threads (before)": tinyattn_side(GRU, cores)}
    if torch is not None:
        sides["torch 1 thread"], sides["torch 2 threads"] = torch_side(torch, 1), torch_side(torch, 2)
    return sides


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternations of idle and busy (default 8)")
    parser.add_argument("--block", type=int, default=8, help="timed steps per side per block (default 8)")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds of sleep before each block (default 0.25)")
    parser.add_argument("--skip-torch", action="store_true", help="time tinyattn only")
    common.add_out_argument(parser, "contention")
    args = parser.parse_args()
    torch = common.torch_or_none(args.skip_torch)
    machine = common.start()
    if cpu.core_count() < 2:
        print("this process may run on one core only: one busy process would leave it none; nothing to compare")
        return
    sides = sides_to_time(torch)
    names = list(sides)
    times = {name: {"idle": [], "busy": []} for name in names}
    counters = dict.fromkeys(names, 0)

    def step(name):
        seconds = sides[name](counters[name])
        counters[name] += 1
        return seconds

    for name in names:  # warm-up, idle
        for _ in range(3):
            step(name)
    with busy_process() as (make_busy, make_idle):
        for r in range(args.rounds):
            for load in (("idle", "busy") if r % 2 == 0 else ("busy", "idle")):
                (make_busy if load == "busy" else make_idle)()
                for name in (names if r % 2 == 0 else names[::-1]):
                    time.sleep(args.pause)
                    step(name)  # untimed: wakes this side's worker threads
                    times[name][load] += [step(name) for _ in range(args.block)]
            print(f"round {r + 1}/{args.rounds}", flush=True)
        make_idle()
    figures = {}
    for name in names:
        idle, busy = (common.median(times[name][load]) for load in ("idle", "busy"))
        figures[name] = {"median_step_ms_idle": idle * 1e3, "median_step_ms_busy": busy * 1e3, "busy_over_idle": busy / idle,
                         "steps_each": len(times[name]["idle"])}
        print(f"{name:50s} idle {idle * 1e3:7.1f} ms  busy {busy * 1e3:7.1f} ms  busy/idle {busy / idle:5.2f}")
    settings = {"rounds": args.rounds, "block": args.block, "pause_s": args.pause, "busy_processes": 1,
                "cores": cpu.core_count(), "blas_kernels": cpu.blas_kernels()}
    common.write_results("contention", machine, settings, figures, args.out)


if __name__ == "__main__":
    main()
