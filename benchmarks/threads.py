"""Where threads pay: train.py's step on 1 thread and on 2 (the batch's parts side by side), per config.

    python benchmarks/threads.py [--rounds 16 --block 4]

For each config, one model takes training steps (forward, backward, Adam) alternately
with 1 and with 2 threads (tinyattn.parallel.ShardedBackward), in blocks of --block
steps after a short pause, on the same pre-generated batches; the k-th step on 2 threads
is paired with the k-th on 1. Reports both medians and the median of the pairwise
ratios 2 threads / 1 thread: below 1 the threads pay. The configs are the reference run
and variations of its model and batch size; train.py's default (shards_for) is shown
beside each. Needs 2 cores and a NumPy whose BLAS thread count tinyattn can set; says so
and stops otherwise. Writes benchmarks/results/threads.json.
"""
import argparse
import time

import common
from tinyattn.parallel import default_shards
from models.training import sharded_backward_for, shards_for

# (name, changes to the reference config, whether a step takes long enough to need fewer of them)
CONFIGS = [
    ("reference: transformer, batch 64", {}, False),
    ("transformer, batch 48", {"batch_size": 48}, False),
    ("transformer, batch 32", {"batch_size": 32}, False),
    ("transformer, batch 16", {"batch_size": 16}, False),
    ("transformer, batch 256", {"batch_size": 256}, True),
    ("transformer, d_model 128, batch 64", {"d_model": 128, "d_ff": 512}, False),
    ("gpt, batch 64", {"model": "gpt"}, False),
    ("gpt, batch 32", {"model": "gpt", "batch_size": 32}, False),
    ("rnn-attention, batch 64", {"model": "rnn-attention"}, False),
    ("rnn-attention, batch 256", {"model": "rnn-attention", "batch_size": 256}, True),
    ("compute-bound: d_model 256, 4+4 layers, batch 64", common.COMPUTE_BOUND.to_dict(), True),
]
DISTINCT_BATCHES = 16


def compare(config, rounds, block, pause):
    """Median step with 1 and 2 threads and the median pairwise ratio, one model, alternating."""
    run = common.train_run(config)
    batches = [next(run.stream) for _ in range(DISTINCT_BATCHES)]
    sharded = {threads: sharded_backward_for(config.replace(threads=threads)) for threads in (1, 2)}  # as --threads 1, 2
    times, position = {1: [], 2: []}, {1: 0, 2: 0}

    def step(threads):
        batch = batches[position[threads] % DISTINCT_BATCHES]
        position[threads] += 1
        return common.timed_train_step(run.model, run.optimizer, batch, sharded[threads])[0]

    for threads in (1, 2):
        step(threads)
    for r in range(rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            time.sleep(pause)
            step(threads)  # untimed, as in step_time.py
            times[threads] += [step(threads) for _ in range(block)]
    return {"median_step_ms": {str(k): common.median(t) * 1e3 for k, t in times.items()},
            "median_ratio_2_over_1": common.median_ratio(times[2], times[1]),
            "steps_each": rounds * block, "default_threads": shards_for(config)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="alternations per config (default 16)")
    parser.add_argument("--block", type=int, default=4, help="timed steps per side per round (default 4)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds of sleep before each block (default 0.05)")
    common.add_out_argument(parser, "threads")
    args = parser.parse_args()
    machine = common.start()
    if default_shards() < 2:
        print("this machine cannot run 2 threads per step (one core, or a BLAS whose threads tinyattn cannot set): nothing to compare")
        return
    figures = {}
    heavy_rounds, heavy_block = max(2, args.rounds // 4), max(1, args.block // 2)
    for name, overrides, heavy in CONFIGS:
        print(f"{name} ...", flush=True)
        figures[name] = compare(common.REFERENCE.replace(**overrides), heavy_rounds if heavy else args.rounds,
                                heavy_block if heavy else args.block, args.pause)
    settings = {"configs": {name: overrides for name, overrides, _ in CONFIGS}, "rounds": args.rounds, "block": args.block,
                "pause_s": args.pause, "heavy_configs_rounds_block": [heavy_rounds, heavy_block]}
    common.write_results("threads", machine, settings, figures, args.out)
    print("\ntraining step on 1 thread and on 2 (the batch's parts side by side)")
    common.table(["config", "1 thread ms", "2 threads ms", "2 / 1", "train.py default"],
                 [[name, f"{f['median_step_ms']['1']:.1f}", f"{f['median_step_ms']['2']:.1f}", f"{f['median_ratio_2_over_1']:.2f}",
                   f"{f['default_threads']} thread{'s' if f['default_threads'] > 1 else ''}"] for name, f in figures.items()])


if __name__ == "__main__":
    main()
