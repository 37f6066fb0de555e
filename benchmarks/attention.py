"""Composed vs fused scaled dot-product attention (the two paths of tinyattn.kernels): forward + backward time.

    python benchmarks/attention.py [--batch 64 --heads 4 --length 17 --head-dim 16 --repeats 200]

Both variants run alternately in one process on the same inputs, so the ratio is fair
on a shared, noisy machine. Prints a table and writes JSON to benchmarks/results/.
"""
import argparse
import json
import os
import platform
import statistics
import time

import common  # noqa: F401  (first: it puts the checkout on sys.path)
import tinyattn as ta
from tinyattn import functional as F
from tinyattn import kernels


def time_once(q, k, v, mask, path):
    start = time.perf_counter()
    with kernels.use(path):
        out = F.scaled_dot_product_attention(q, k, v, mask=mask, causal=True)
        out.backward(ta.ones_like(out))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=17)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json"))
    args = parser.parse_args()
    rng = ta.Generator(0)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    q, k, v = (ta.randn(*shape, generator=rng, requires_grad=True) for _ in range(3))
    mask = ta.tensor([[True] * args.length] * args.batch)[:, None, None, :]
    times = {"composed": [], "fused": []}
    for _ in range(10):  # warm-up: caches, allocator
        time_once(q, k, v, mask, "fused"), time_once(q, k, v, mask, "composed")
    for _ in range(args.repeats):
        for path in ("composed", "fused"):
            times[path].append(time_once(q, k, v, mask, path))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratios = [f / c for f, c in zip(times["fused"], times["composed"])]
    result = {"shape": shape, "median_ms": medians, "median_ratio_fused_over_composed": statistics.median(ratios),
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "openblas_env": {key: os.environ.get(key) for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}
    print(f"attention forward+backward, q/k/v {shape}, causal + padding mask, float32, {args.repeats} runs each")
    print(f"{'variant':<10} {'median ms':>10}")
    for name, ms in medians.items():
        print(f"{name:<10} {ms:>10.3f}")
    print(f"fused / composed, median of pairwise ratios: {result['median_ratio_fused_over_composed']:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
