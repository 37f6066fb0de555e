"""train.py's training step at two checkouts of tinyattn, taking turns: did a change cost speed?

    git worktree add /tmp/before <commit>
    python benchmarks/commits.py /tmp/before [--after .] [--threads 2] [--pairs 300 --block 10 --pause 0.25]

Each checkout runs in its own long-lived process that imports that checkout's `models`
and `tinyattn` and builds train.py's reference run (`models.training.Run`; `--threads`
as the flag, by default train.py's own choice). The processes take turns, one block of
--block steps at a time while the other waits on its pipe, so only one of them uses
the cores at any moment and a slow moment of the shared machine hits both alike. Each
block starts after a --pause of sleep (the last block's BLAS threads stop spinning) and
one untimed step; the order flips every round. Both sides train the same pre-generated
batches from the same weights. Reports each side's median step and the median of the
pairwise ratios after / before (the k-th step of one with the k-th of the other).
Writes benchmarks/results/commits.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import common

DISTINCT_BATCHES = 32
# What each side's process runs: the checkout's own train.py step, timed, `block` steps per request.
WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from models import Config
from models.training import Run, forward_backward
from tinyattn.cpu import tune_allocator
tune_allocator()
threads = None if sys.argv[2] == "default" else int(sys.argv[2])
run = Run(Config(threads=threads))
batches = [next(run.stream) for _ in range(int(sys.argv[3]))]
done = 0

def step():
    global done
    start = time.perf_counter()
    run.optimizer.zero_grad()
    loss, _ = forward_backward(run.model, run.params, batches[done % len(batches)], run.sharded)
    loss.item()
    run.optimizer.step()
    done += 1
    return time.perf_counter() - start

print(json.dumps({"shards": run.sharded.shards}), flush=True)
for line in sys.stdin:
    block, pause = json.loads(line)
    time.sleep(pause)
    step()  # untimed: wakes this side's worker threads
    print(json.dumps([step() for _ in range(block)]), flush=True)
"""


def start_side(checkout, threads):
    process = subprocess.Popen([sys.executable, "-c", WORKER, os.path.abspath(checkout), str(threads), str(DISTINCT_BATCHES)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return process, json.loads(process.stdout.readline())


def timed_block(process, block, pause):
    process.stdin.write(json.dumps([block, pause]) + "\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a checkout of the earlier commit (git worktree add DIR COMMIT)")
    parser.add_argument("--after", default=common.ROOT, help="the later checkout (default: this one)")
    parser.add_argument("--threads", default="default", help="train.py's --threads for both sides (default: its own choice)")
    parser.add_argument("--pairs", type=int, default=300, help="timed steps each (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps each first (default 30)")
    parser.add_argument("--block", type=int, default=10, help="steps per turn (default 10)")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds of sleep before each turn (default 0.25)")
    common.add_out_argument(parser, "commits")
    args = parser.parse_args()
    machine = common.start()
    checkouts = {"before": args.before, "after": args.after}
    sides = {name: start_side(path, args.threads) for name, path in checkouts.items()}
    try:
        for name, (process, _) in sides.items():
            timed_block(process, args.warmup, 0)
        times = {name: [] for name in sides}
        rounds = -(-args.pairs // args.block)
        for r in range(rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                times[name] += timed_block(sides[name][0], min(args.block, args.pairs - r * args.block), args.pause)
    finally:
        for process, _ in sides.values():
            process.stdin.close()
            process.wait()
    ratio = common.median_ratio(times["after"], times["before"])
    for name in sides:
        print(f"{name:6s} {checkouts[name]}: median step {common.median(times[name]) * 1e3:.2f} ms "
              f"({sides[name][1]['shards']} shard(s))")
    print(f"after / before, median of pairwise ratios: {ratio:.3f}")
    figures = {"median_step_ms": {name: common.median(t) * 1e3 for name, t in times.items()},
               "median_ratio_after_over_before": ratio, "shards": {name: side[1]["shards"] for name, side in sides.items()},
               "step_ms": {name: [round(t * 1e3, 3) for t in ts] for name, ts in times.items()}}
    settings = {"checkouts": checkouts, "threads": args.threads, "pairs": args.pairs, "warmup": args.warmup,
                "block": args.block, "pause_s": args.pause, "commits": {name: _commit(path) for name, path in checkouts.items()}}
    common.write_results("commits", machine, settings, figures, args.out)


def _commit(checkout):
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return result.stdout.strip() or None


if __name__ == "__main__":
    main()
