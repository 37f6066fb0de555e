"""Resident memory over a long training run of the reference config: peak, and growth after warm-up.

    python benchmarks/memory.py [--steps 2000]

Trains as train.py does, with its Run (fresh batches from the seeded stream, Adam lr 3e-3
with WarmupCosine(100, 1500), the batch's shards side by side; no evaluation), and reads VmRSS / VmHWM from /proc/self/status
every 100 steps (ru_maxrss from getrusage where /proc is missing: peak only), and the RSS of
the step's worker processes, if it runs its parts in processes (a worker's RSS counts the
pages it still shares with this process, as this one's does). A leak
shows as RSS still growing after step 100, once the allocator and the optimizer state
have settled. torch is never imported here. Writes benchmarks/results/memory.json.
"""
import argparse
import resource
import sys
import time

import common

SAMPLE_EVERY = 100
SETTLED_STEP = 100


def memory_mib(pid="self"):
    """{'rss': current, 'peak': high-water mark} in MiB of a process (this one by default);
    rss is None without /proc."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS", "VmHWM")))
        return {"rss": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024,
                "source": f"/proc/{pid}/status"}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"rss": None, "peak": peak / (1024 * 1024 if sys.platform == "darwin" else 1024), "source": "getrusage"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    common.add_out_argument(parser, "memory")
    args = parser.parse_args()
    machine = common.start()
    config = common.REFERENCE
    before_model = memory_mib()
    run = common.train_run(config)
    start_memory = memory_mib()
    samples = [{"step": 0, **start_memory}]
    print(f"training {args.steps} steps, reading memory every {SAMPLE_EVERY} ...", flush=True)
    start = time.perf_counter()
    loss_value = None
    for step in range(1, args.steps + 1):
        loss_value = run.train_step()[0]
        if step % SAMPLE_EVERY == 0 or step == args.steps:
            samples.append({"step": step, **memory_mib(), "workers": [memory_mib(pid) for pid in run.sharded.worker_pids]})
    seconds = time.perf_counter() - start
    end = samples[-1]
    settled = next((s for s in samples if s["step"] == SETTLED_STEP), None)
    growth, worker_growth = None, []
    if settled and settled["rss"] and end["step"] > SETTLED_STEP:
        growth = 100.0 * (end["rss"] - settled["rss"]) / settled["rss"]
        worker_growth = [100.0 * (last["rss"] - first["rss"]) / first["rss"]
                         for first, last in zip(settled["workers"], end["workers"]) if first["rss"] and last["rss"]]
    figures = {"peak_mib": end["peak"], "rss_before_model_mib": before_model["rss"], "rss_at_start_mib": start_memory["rss"],
               "rss_at_step_100_mib": settled and settled["rss"], "rss_at_end_mib": end["rss"],
               "growth_after_step_100_percent": growth, "worker_rss_at_end_mib": [w["rss"] for w in end["workers"]],
               "worker_growth_after_step_100_percent": worker_growth, "final_loss": loss_value, "train_s": seconds,
               "source": end["source"], "samples": samples}
    settings = {"config": config.to_dict(), "steps": args.steps, "sample_every": SAMPLE_EVERY, "evaluation": None, "tinyattn_threads": run.sharded.shards}
    common.write_results("memory", machine, settings, figures, args.out)

    mib = lambda value: "-" if value is None else f"{value:.1f} MiB"
    print(f"\nresident memory, reference config, {args.steps} training steps in {seconds:.0f} s (final loss {loss_value:.4f})")
    common.table(["figure", "value"], [
        ["RSS after imports, before the model", mib(before_model["rss"])],
        ["RSS at step 0 (model + Adam state)", mib(start_memory["rss"])],
        [f"RSS at step {SETTLED_STEP}", mib(settled and settled["rss"])],
        [f"RSS at step {end['step']}", mib(end["rss"])],
        ["peak (VmHWM)" if end["source"] != "getrusage" else "peak (ru_maxrss)", mib(end["peak"])],
        [f"growth after step {SETTLED_STEP}", "-" if growth is None else f"{growth:+.1f}%"],
        *([f"worker process {index + 2}: RSS at step {end['step']}, growth after step {SETTLED_STEP}",
           f"{mib(worker['rss'])}, {grown:+.1f}%"] for index, (worker, grown) in enumerate(zip(end["workers"], worker_growth)))])


if __name__ == "__main__":
    main()
