"""Where threads and processes pay: train.py's step on 1 thread, and on 2 threads or 2 processes
(the batch's parts side by side), per config.

    python benchmarks/threads.py [--rounds 16 --block 4]

For each config, one model takes training steps (forward, backward, Adam) alternately
on 1 thread, on 2 threads and in 2 processes (tinyattn.parallel.ShardedBackward), in
blocks of --block steps after a short pause, on the same pre-generated batches; the k-th
step of a side is paired with the k-th on 1 thread. Reports the medians and the medians
of the pairwise ratios to 1 thread: below 1 the split pays. The configs are the reference run
and variations of its model and batch size; train.py's default (shards_for) is shown
beside each. Needs 2 cores and a NumPy whose BLAS thread count tinyattn can set; says so
and stops otherwise. Writes benchmarks/results/threads.json.
"""
import argparse
import time

import common
from tinyattn.parallel import default_shards
from models.training import sharded_backward_for, threads_per_step

# (name, changes to the reference config, whether a step takes long enough to need fewer of them)
CONFIGS = [
    ("reference: transformer, batch 64", {}, False),
    ("transformer, batch 48", {"batch_size": 48}, False),
    ("transformer, batch 32", {"batch_size": 32}, False),
    ("transformer, batch 16", {"batch_size": 16}, False),
    ("transformer, batch 8", {"batch_size": 8}, False),
    ("transformer, batch 256", {"batch_size": 256}, True),
    ("transformer, d_model 128, batch 64", {"d_model": 128, "d_ff": 512}, False),
    ("gpt, batch 64", {"model": "gpt"}, False),
    ("gpt, batch 32", {"model": "gpt", "batch_size": 32}, False),
    ("gpt, batch 16", {"model": "gpt", "batch_size": 16}, False),
    ("rnn-attention, batch 64", {"model": "rnn-attention"}, False),
    ("rnn-attention, batch 256", {"model": "rnn-attention", "batch_size": 256}, True),
    ("rnn-attention, batch 16", {"model": "rnn-attention", "batch_size": 16}, False),
    ("rnn, batch 64", {"model": "rnn"}, False),
    ("rnn, batch 16", {"model": "rnn", "batch_size": 16}, False),
    ("compute-bound: d_model 256, 4+4 layers, batch 64", common.COMPUTE_BOUND.to_dict(), True),
]
DISTINCT_BATCHES = 16


SIDES = {"1 thread": {"threads": 1}, "2 threads": {"threads": 2, "parallel": "threads"},
         "2 processes": {"threads": 2, "parallel": "processes"}}  # as train.py --threads 1, --threads 2 --parallel ...


def compare(config, rounds, block, pause):
    """Median step of each side and the median pairwise ratios to 1 thread's, one model, alternating."""
    run = common.train_run(config)
    batches = [next(run.stream) for _ in range(DISTINCT_BATCHES)]
    sharded = {side: sharded_backward_for(config.replace(**changes)) for side, changes in SIDES.items()}
    times, position = {side: [] for side in SIDES}, {side: 0 for side in SIDES}

    def step(side):
        batch = batches[position[side] % DISTINCT_BATCHES]
        position[side] += 1
        return common.timed_train_step(run.model, run.optimizer, batch, sharded[side])[0]

    for side in SIDES:
        step(side)
    for r in range(rounds):
        for side in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
            time.sleep(pause)
            step(side)  # untimed, as in step_time.py
            times[side] += [step(side) for _ in range(block)]
    for side in sharded.values():
        side.close()
    return {"median_step_ms": {side: common.median(t) * 1e3 for side, t in times.items()},
            "median_ratio_to_1_thread": {side: common.median_ratio(times[side], times["1 thread"]) for side in SIDES if side != "1 thread"},
            "steps_each": rounds * block, "default": threads_per_step(sharded_backward_for(config))}


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
    print("\ntraining step on 1 thread, and on 2 threads or 2 processes (the batch's parts side by side)")
    common.table(["config", *(f"{side} ms" for side in SIDES), "threads / 1", "processes / 1", "train.py default"],
                 [[name, *(f"{f['median_step_ms'][side]:.1f}" for side in SIDES),
                   *(f"{f['median_ratio_to_1_thread'][side]:.2f}" for side in ("2 threads", "2 processes")), f["default"]]
                  for name, f in figures.items()])

if __name__ == "__main__":
    main()
