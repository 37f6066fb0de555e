"""Training step time (forward + backward + Adam) of tinyattn vs a PyTorch twin, and how near
tinyattn gets to NumPy's GEMM rate when the model is wide.

    python benchmarks/step_time.py [--pairs 300 --warmup 30 --block 10 --pause 0.25 --compute-steps 20 --skip-torch]

Part 1, the reference config (train.py's defaults): tinyattn takes its step as train.py
does, the batch split into shards that run side by side on the cores
(tinyattn.parallel; 2 threads where there are 2 cores), and, for comparison, the same
step on one thread ("tinyattn-1thread"). All sides start from the same weights and
train on the same pre-generated batches, taking turns in one process, so a
slow moment of this shared machine hits both alike. They take turns in blocks of
--block steps (the order flips every round), not step by step: after its last GEMM,
OpenBLAS keeps its worker threads spinning for about 0.1 s, and on 2 cores that spinning
took PyTorch's next step from about 27 to 130 ms. So each block starts after a --pause
of sleep and one untimed step. The k-th timed step of one side pairs with the k-th of the
other; reports each side's median step and the median of the pairwise ratios
tinyattn / torch (and tinyattn-1thread / torch).

Part 2, a compute-bound config (d_model 256, 4+4 layers, d_ff 1024, lengths up to 32):
tinyattn's median step, the GFLOP/s its matrix products reach (FLOPs counted from each
batch's padded shapes), and NumPy's own float32 GEMM rate at n=256 and n=512 measured
between those steps. Writes benchmarks/results/step_time.json.
"""
import argparse
import time

import common
from models import build_model
from tinyattn import optim
from models.training import sharded_backward_for

DISTINCT_BATCHES = 32


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


def reference_pairs(args, torch):
    """Alternating steps on the reference config; returns the figures."""
    config = common.REFERENCE
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
        from twin import Seq2SeqTwin, batch_tensors
        twin = Seq2SeqTwin.from_tinyattn(model)  # same starting weights
        twin_optimizer = torch.optim.Adam(twin.parameters(), lr=config.lr)
        tensors = [batch_tensors(batch) for batch in batches]
        sides["torch"] = lambda i: torch_step(twin, twin_optimizer, tensors[i % len(tensors)])
    names = list(sides)
    counters = dict.fromkeys(names, 0)

    def run(name):  # each side walks the same batch sequence
        result = sides[name](counters[name])
        counters[name] += 1
        return result

    for _ in range(args.warmup):
        for name in names:
            run(name)
    times, losses = {name: [] for name in names}, {name: None for name in names}
    rounds = -(-args.pairs // args.block)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if len(names) > 1:
                time.sleep(args.pause)  # the other side's BLAS / OpenMP workers stop spinning
                run(name)               # untimed: wakes this side's worker threads
            for _ in range(min(args.block, args.pairs - r * args.block)):
                seconds, losses[name] = run(name)
                times[name].append(seconds)
    figures = {"steps_each": args.pairs, "tinyattn_threads": {name: sharded_backward_for(side_config).shards for name, side_config in configs.items()}, "warmup_steps_each": args.warmup, "block": args.block, "pause_s": args.pause,
               "median_step_ms": {name: common.median(t) * 1e3 for name, t in times.items()},
               "quartiles_step_ms": {name: [q * 1e3 for q in common.quartiles(t)] for name, t in times.items()},
               "last_loss": losses,
               "step_ms": {name: [round(t * 1e3, 3) for t in ts] for name, ts in times.items()},
               "mean_padded_shape": {"source": sum(b.source.shape[1] for b in batches) / len(batches),
                                     "decoder": sum(b.decoder_input.shape[1] for b in batches) / len(batches)}}
    if torch is not None:
        for name in configs:
            figures[f"median_ratio_{name.replace('-', '_')}_over_torch"] = common.median_ratio(times[name], times["torch"])
        figures["torch_threads"] = torch.get_num_threads()
    return figures


def compute_bound(args):
    """tinyattn's step on the wide config, with NumPy GEMM samples taken between its steps."""
    config = common.COMPUTE_BOUND
    task = common.task_for(config)
    stream = task.batches(config.batch_size, config.seed)
    batches = [next(stream) for _ in range(8)]
    model = build_model(config, task.vocab_size)
    optimizer = optim.Adam(model.parameters(), lr=config.lr)
    sharded = sharded_backward_for(config)
    probes = {256: common.GemmProbe(256, 40), 512: common.GemmProbe(512, 6)}
    for i in range(3):
        common.timed_train_step(model, optimizer, batches[i % len(batches)], sharded)
        for probe in probes.values():
            probe.sample()
    step_times, step_rates, gemm = [], [], {n: [] for n in probes}
    for i in range(args.compute_steps):
        batch = batches[i % len(batches)]
        seconds, _ = common.timed_train_step(model, optimizer, batch, sharded)
        step_times.append(seconds)
        step_rates.append(common.training_step_flops(batch, config, task.vocab_size) / seconds / 1e9)
        for n, probe in probes.items():
            gemm[n].append(probe.sample())
    gemm_medians = {str(n): common.median(samples) for n, samples in gemm.items()}
    best = max(gemm_medians, key=gemm_medians.get)
    achieved = common.median(step_rates)
    return {"steps": args.compute_steps, "tinyattn_threads": sharded.shards, "median_step_ms": common.median(step_times) * 1e3,
            "median_training_step_gflop": common.median(common.training_step_flops(b, config, task.vocab_size) for b in batches) / 1e9,
            "achieved_gflops": achieved, "numpy_gemm_gflops": gemm_medians, "reference_gemm_n": int(best),
            "achieved_over_gemm": achieved / gemm_medians[best]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="alternating timed steps per side (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per side first (default 30)")
    parser.add_argument("--block", type=int, default=10, help="consecutive timed steps of one side before switching (default 10)")
    parser.add_argument("--pause", type=float, default=0.25,
                        help="untimed seconds of sleep before each block, so the other side's worker threads stop spinning (default 0.25)")
    parser.add_argument("--compute-steps", type=int, default=20, help="timed steps of the compute-bound config (default 20; 0 skips it)")
    parser.add_argument("--skip-torch", action="store_true", help="time tinyattn only")
    common.add_out_argument(parser, "step_time")
    args = parser.parse_args()
    torch = common.torch_or_none(args.skip_torch)
    machine = common.start()
    print(f"reference config: {args.warmup} warm-up + {args.pairs} timed steps per side, alternating ...", flush=True)
    reference = reference_pairs(args, torch)
    compute = None
    if args.compute_steps > 0:
        print(f"compute-bound config: {args.compute_steps} steps, NumPy GEMM samples between them ...", flush=True)
        compute = compute_bound(args)
    settings = {"reference_config": common.REFERENCE.to_dict(), "compute_bound_config": common.COMPUTE_BOUND.to_dict(),
                "pairs": args.pairs, "warmup": args.warmup, "block": args.block, "pause_s": args.pause, "compute_steps": args.compute_steps,
                "distinct_batches": DISTINCT_BATCHES, "optimizer": "Adam lr 3e-3, constant", "torch": torch is not None}
    common.write_results("step_time", machine, settings, {"reference": reference, "compute_bound": compute}, args.out)

    print("\ntraining step (forward + backward + Adam), reference config, batch 64, lengths 1..16")
    medians = reference["median_step_ms"]
    rows = [[name, f"{ms:.2f}", "{:.2f}-{:.2f}".format(*reference["quartiles_step_ms"][name])] for name, ms in medians.items()]
    common.table(["side", "median ms", "quartiles ms"], rows)
    for name, shards in reference["tinyattn_threads"].items():
        ratio = reference.get(f"median_ratio_{name.replace('-', '_')}_over_torch")
        if ratio is not None:
            print(f"{name} ({shards} thread{'s' if shards > 1 else ''} per step) / torch, median of {args.pairs} pairwise ratios: {ratio:.2f}")
    if compute:
        print(f"\ncompute-bound config (d_model 256, 4+4 layers, d_ff 1024, lengths 1..32, batch 64), "
              f"{compute['median_training_step_gflop']:.1f} GFLOP of matrix products per step")
        gemm = compute["numpy_gemm_gflops"]
        common.table(["figure", "value"], [
            ["tinyattn median step ms", f"{compute['median_step_ms']:.1f}"],
            ["tinyattn achieved GFLOP/s", f"{compute['achieved_gflops']:.1f}"],
            ["numpy float32 GEMM GFLOP/s, n=256", f"{gemm['256']:.1f}"],
            ["numpy float32 GEMM GFLOP/s, n=512", f"{gemm['512']:.1f}"],
            [f"achieved / GEMM (n={compute['reference_gemm_n']})", f"{compute['achieved_over_gemm']:.2f}"]])


if __name__ == "__main__":
    main()
