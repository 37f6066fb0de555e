"""Training step time (forward + backward + Adam) of tinyattn against a PyTorch twin, at every
size, and how near the matrix products of the compute-bound step get to NumPy's own GEMM rate.

    python benchmarks/step_time.py [--rows reference,batch16,batch256,gpt,compute-bound]
                                   [--pairs 300 --compute-pairs 30 --warmup 30 --block 10 --pause 0.25 --skip-torch]

Part 1, one row per configuration (ROWS): the reference config (train.py's defaults), the
same at batch 16 and 256, the decoder-only model (--model gpt), and a compute-bound
config (d_model 256, 4+4 layers, d_ff 1024, lengths up to 32). tinyattn takes its step
as train.py does (models.training.sharded_backward_for: where it pays, the batch split
into shards that run side by side on the cores, in worker processes on Linux), and, where
that is more than one part, the same step on one thread ("tinyattn-1thread", as --threads 1). All sides
start from the same weights and train on the same pre-generated batches, taking turns
in one process, so a slow moment of this shared machine hits them alike. They take turns
in blocks of --block steps (the order flips every round), not step by step: after its
last GEMM, OpenBLAS keeps its worker threads spinning for about 0.1 s, and on 2 cores
that spinning took PyTorch's next step from about 27 to 130 ms. So each block starts
after a --pause of sleep and one untimed step. The k-th timed step of one side pairs
with the k-th of the other; each row reports each side's median step and the median of
the pairwise ratios tinyattn / torch (and tinyattn-1thread / torch). batch256 takes a
third of --pairs, compute-bound --compute-pairs in blocks of a fifth of --block.

Part 2, the compute-bound step's matrix products: every product of a few steps, as
train.py takes them (its parts on threads, whose products this process can observe,
where train.py runs them in processes), is recorded (shapes, calling thread, seconds), then run again by
NumPy on fresh contiguous arrays of the same shapes, each thread's products on a thread
of its own and all at once, with BLAS on the same number of threads. Their rate in the
step over their rate replayed says whether tinyattn's products run as fast as NumPy's
GEMM can at those shapes. Writes benchmarks/results/step_time.json.
"""
import argparse
import collections
import threading
import time

import numpy  # the replay's host arrays: they stand for what tinyattn's products read, outside any tensor

import common
from models import build_model
from models.training import sharded_backward_for, shards_for, threads_per_step
from tinyattn import backend, cpu, optim
from tinyattn.profiler import matmul_flops

DISTINCT_BATCHES = 32
ROWS = {
    "reference": common.REFERENCE,
    "batch16": common.REFERENCE.replace(batch_size=16),
    "batch256": common.REFERENCE.replace(batch_size=256),
    "gpt": common.REFERENCE.replace(model="gpt"),
    "compute-bound": common.COMPUTE_BOUND,
}
RECORDED_STEPS = 3  # compute-bound steps whose products part 2 records


def torch_step(twin, optimizer, tensors):
    start = time.perf_counter()
    loss = twin.loss(*tensors)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    value = loss.item()
    return time.perf_counter() - start, value


def tinyattn_side(config, task, batches):
    """A fresh model (the config's seed: every side starts from the same weights) and its
    timed step on batch i, on the threads train.py gives the config."""
    model = build_model(config, task.vocab_size)
    optimizer = optim.Adam(model.parameters(), lr=config.lr)
    sharded = sharded_backward_for(config)
    return model, lambda i: common.timed_train_step(model, optimizer, batches[i % len(batches)], sharded)


def row_pairs(config, pairs, block, args, torch):
    """Steps of each side of one row, taking turns in blocks; returns the row's figures."""
    task = common.task_for(config)
    stream = task.batches(config.batch_size, config.seed)
    batches = [next(stream) for _ in range(DISTINCT_BATCHES)]
    sides = {}
    configs = {"tinyattn": config}
    if sharded_backward_for(config).shards > 1:  # train.py's default, and the same engine on one thread (--threads 1)
        configs["tinyattn-1thread"] = config.replace(threads=1)
    for name, side_config in configs.items():
        model, sides[name] = tinyattn_side(side_config, task, batches)
    if torch is not None:
        from twin import loss_inputs, twin_of
        twin = twin_of(model)  # same starting weights
        twin_optimizer = torch.optim.Adam(twin.parameters(), lr=config.lr)
        tensors = [loss_inputs(twin, batch) for batch in batches]
        sides["torch"] = lambda i: torch_step(twin, twin_optimizer, tensors[i % len(tensors)])
    names = list(sides)
    counters = dict.fromkeys(names, 0)

    def run(name):  # each side walks the same batch sequence
        result = sides[name](counters[name])
        counters[name] += 1
        return result

    for _ in range(min(args.warmup, pairs)):
        for name in names:
            run(name)
    times, losses = {name: [] for name in names}, {name: None for name in names}
    for r in range(-(-pairs // block)):
        for name in (names if r % 2 == 0 else names[::-1]):
            if len(names) > 1:
                time.sleep(args.pause)  # the other side's BLAS / OpenMP workers stop spinning
                run(name)               # untimed: wakes this side's worker threads
            for _ in range(min(block, pairs - r * block)):
                seconds, losses[name] = run(name)
                times[name].append(seconds)
    figures = {"config": config.to_dict(), "steps_each": pairs, "block": block,
               "tinyattn_threads": {name: sharded_backward_for(c).threads for name, c in configs.items()},
               "tinyattn_step": {name: threads_per_step(sharded_backward_for(c)) for name, c in configs.items()},
               "median_step_ms": {name: common.median(t) * 1e3 for name, t in times.items()},
               "quartiles_step_ms": {name: [q * 1e3 for q in common.quartiles(t)] for name, t in times.items()},
               "last_loss": losses,
               "step_ms": {name: [round(t * 1e3, 3) for t in ts] for name, ts in times.items()}}
    if torch is not None:
        figures["median_ratio_over_torch"] = {name: common.median_ratio(times[name], times["torch"]) for name in configs}
        figures["torch_threads"] = torch.get_num_threads()
    return figures


def record_products(config, steps):
    """The matrix products of `steps` training steps as train.py takes them: per calling thread,
    a list of (left shape, right shape, seconds); and the BLAS threads each thread's products had."""
    task = common.task_for(config)
    stream = task.batches(config.batch_size, config.seed)
    batches = [next(stream) for _ in range(steps + 1)]
    model = build_model(config, task.vocab_size)
    optimizer = optim.Adam(model.parameters(), lr=config.lr)
    # train.py's parts on threads: a worker process's products could not be observed from here, and
    # threads run the same shapes at the same time on the same cores
    sharded = sharded_backward_for(config.replace(threads=shards_for(config), parallel="threads"))
    common.timed_train_step(model, optimizer, batches[-1], sharded)  # warm-up: allocator, optimizer state
    calls = collections.defaultdict(list)

    def observe(a, b, seconds):
        calls[threading.get_ident()].append((a.shape, b.shape, seconds))

    handle = backend.add_matmul_hook(observe)
    try:
        step_seconds = sum(common.timed_train_step(model, optimizer, batch, sharded)[0] for batch in batches[:steps])
    finally:
        handle.remove()
    return list(calls.values()), sharded.blas_threads_per_shard, step_seconds


def replay_products(per_thread, blas_threads):
    """Each thread's recorded products again, on fresh contiguous float32 arrays of the same shapes,
    the threads' lists run at once on threads of their own; returns each list's seconds."""
    rng = numpy.random.default_rng(0)
    operands = {}
    for calls in per_thread:
        for a_shape, b_shape, _ in calls:
            for shape in (a_shape, b_shape):
                if shape not in operands:
                    operands[shape] = rng.standard_normal(shape, dtype=numpy.float32)
    seconds = [0.0] * len(per_thread)
    start = threading.Barrier(len(per_thread))

    def replay(index):
        products = [(operands[a], operands[b]) for a, b, _ in per_thread[index]]
        start.wait()
        for a, b in products:
            began = time.perf_counter()
            numpy.matmul(a, b)
            seconds[index] += time.perf_counter() - began

    with cpu.blas_threads(blas_threads):
        workers = [threading.Thread(target=replay, args=(i,)) for i in range(len(per_thread))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return seconds


def gemm_efficiency(config, rounds):
    """Part 2: the step's products against the same products replayed by NumPy, `rounds` times
    each way, alternating; rates are total FLOPs over total seconds per round."""
    step_rates, replay_rates, step_shares = [], [], []
    for _ in range(rounds):
        per_thread, blas_threads, step_seconds = record_products(config, RECORDED_STEPS)
        flops = sum(matmul_flops(a, b) for calls in per_thread for a, b, _ in calls)
        in_step = sum(seconds for calls in per_thread for _, _, seconds in calls)
        step_rates.append(flops / in_step / 1e9)
        step_shares.append(in_step / len(per_thread) / step_seconds)
        replay_rates.append(flops / sum(replay_products(per_thread, blas_threads)) / 1e9)
    calls = sum(len(c) for c in per_thread) // RECORDED_STEPS
    return {"rounds": rounds, "recorded_steps": RECORDED_STEPS, "products_per_step": calls, "threads": len(per_thread),
            "blas_threads_per_thread": blas_threads, "gflop_per_step": flops / RECORDED_STEPS / 1e9,
            "in_step_gflops_per_thread": step_rates, "replayed_gflops_per_thread": replay_rates,
            "products_share_of_step": step_shares,
            "in_step_over_replayed": common.median_ratio(step_rates, replay_rates)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which configs, comma-separated (default all: {','.join(ROWS)})")
    parser.add_argument("--pairs", type=int, default=300, help="timed steps per side for the toy rows (default 300)")
    parser.add_argument("--compute-pairs", type=int, default=30, help="timed steps per side for compute-bound (default 30)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per side first, at most the row's pairs (default 30)")
    parser.add_argument("--block", type=int, default=10, help="consecutive timed steps of one side before switching (default 10)")
    parser.add_argument("--pause", type=float, default=0.25,
                        help="untimed seconds of sleep before each block, so the other side's worker threads stop spinning (default 0.25)")
    parser.add_argument("--gemm-rounds", type=int, default=3,
                        help="part 2: rounds of recording compute-bound products and replaying them (default 3; 0 skips it)")
    parser.add_argument("--skip-torch", action="store_true", help="time tinyattn only")
    common.add_out_argument(parser, "step_time")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown row {unknown[0]!r}; expected some of {', '.join(ROWS)}")
    for flag, value in (("--pairs", args.pairs), ("--compute-pairs", args.compute_pairs), ("--block", args.block)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    torch = common.torch_or_none(args.skip_torch)
    machine = common.start()
    figures = {}
    for row in rows:
        pairs, block = {"batch256": (max(1, args.pairs // 3), args.block),
                        "compute-bound": (args.compute_pairs, max(1, args.block // 5))}.get(row, (args.pairs, args.block))
        print(f"{row}: {min(args.warmup, pairs)} warm-up + {pairs} timed steps per side, alternating in blocks of {block} ...",
              flush=True)
        figures[row] = row_pairs(ROWS[row], pairs, block, args, torch)
    if args.gemm_rounds > 0:
        print(f"compute-bound products: {args.gemm_rounds} rounds of {RECORDED_STEPS} recorded steps, replayed by NumPy ...",
              flush=True)
        figures["compute_bound_products"] = gemm_efficiency(ROWS["compute-bound"], args.gemm_rounds)
    settings = {"rows": {row: ROWS[row].to_dict() for row in rows}, "pairs": args.pairs, "compute_pairs": args.compute_pairs,
                "warmup": args.warmup, "block": args.block, "pause_s": args.pause, "gemm_rounds": args.gemm_rounds,
                "distinct_batches": DISTINCT_BATCHES, "optimizer": "Adam lr 3e-3, constant", "torch": torch is not None}
    common.write_results("step_time", machine, settings, figures, args.out)

    print("\ntraining step (forward + backward + Adam), median ms per side, and tinyattn / torch (median of pairwise ratios)")
    table = []
    for row in rows:
        result = figures[row]
        medians, ratios = result["median_step_ms"], result.get("median_ratio_over_torch", {})
        for name, ms in medians.items():
            runs_on = result["tinyattn_step"].get(name)
            side = name if runs_on is None else f"{name} ({runs_on.replace(' per step', '')})"
            ratio = ratios.get(name)
            table.append([row, side, f"{ms:.1f}", "" if ratio is None else f"{ratio:.2f}"])
    common.table(["config", "side", "median ms", "/ torch"], table)
    products = figures.get("compute_bound_products")
    if products:
        print(f"\ncompute-bound products: {products['products_per_step']} per step, {products['gflop_per_step']:.1f} GFLOP, "
              f"on {products['threads']} threads with {products['blas_threads_per_thread']} BLAS thread each")
        common.table(["figure", "value"], [
            ["GFLOP/s per thread in the step", ", ".join(f"{r:.1f}" for r in products["in_step_gflops_per_thread"])],
            ["GFLOP/s per thread replayed by NumPy", ", ".join(f"{r:.1f}" for r in products["replayed_gflops_per_thread"])],
            ["products' share of the step", ", ".join(f"{s:.0%}" for s in products["products_share_of_step"])],
            ["in the step / replayed (median)", f"{products['in_step_over_replayed']:.2f}"]])


if __name__ == "__main__":
    main()
