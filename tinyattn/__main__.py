"""`python -m tinyattn`: a one-minute tour of the engine.

It checks a gradient against finite differences; draws the attention map of three
queries searching a library of four keys; writes the computation graph of one attention
call as Graphviz DOT (--graph); then fits a small two-layer network to y = sin(3x) with
nothing but Tensor ops and plain gradient descent, showing the loss fall under a
progress bar.
"""
import argparse
import math
import sys
import time

from tqdm import tqdm

import tinyattn as ta
from tinyattn import kernels
from tinyattn.viz import heatmap_text, to_dot


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m tinyattn", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="gradient-descent steps (default 1500)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="backend (default: TINYATTN_DEVICE or cpu)")
    parser.add_argument("--graph", default="tour-graph.dot", help="where the attention's graph goes (default tour-graph.dot)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.hidden <= 0 or not args.lr > 0:
        parser.error("--steps, --hidden and --lr must be positive")
    return args


def show_gradient_check():
    rng = ta.Generator(0)
    a = ta.randn(3, 4, generator=rng, dtype=ta.float64, requires_grad=True)
    b = ta.randn(4, 2, generator=rng, dtype=ta.float64, requires_grad=True)
    ta.gradcheck(lambda a, b: (a @ b).tanh().sum(axis=0), [a, b])
    print("gradcheck: d/da and d/db of sum(tanh(a @ b), axis=0) match central differences (float64)")


BOOKS = ("autodiff", "attention", "GPUs", "RNNs")  # the library's keys: what each book is about


def show_attention_map(graph_path):
    """Three queries searched against the keys of a library of four books: each query's
    weights, softmax(q k^T / sqrt(d)), go to the book whose key it resembles. Writes the
    graph that computed them, gradients included, as DOT."""
    rng = ta.Generator(1)
    keys = ta.tensor([[2.0 if row == column else 0.0 for column in range(4)] for row in range(4)], dtype=ta.float64)  # a direction each
    values = ta.randn(4, 4, generator=rng, dtype=ta.float64)  # what each book holds
    asks_about = [1, 3, 0]  # the queries resemble the keys of attention, RNNs and autodiff, with noise
    queries = (keys[asks_about] + ta.randn(3, 4, generator=rng, dtype=ta.float64) * 0.5).requires_grad_()
    with kernels.use("composed"):  # the engine's own ops, so the graph shows softmax(q k^T / sqrt(d)) v step by step
        fetched, weights = ta.functional.scaled_dot_product_attention(queries[None], keys[None], values[None],
                                                                      return_weights=True)
    print("attention of 3 queries over 4 books (rows: queries, columns: keys; darker is more weight):")
    print(heatmap_text(weights[0], [f"q{i + 1}: {BOOKS[book]}?" for i, book in enumerate(asks_about)], list(BOOKS)))
    picked = [BOOKS[int(i)] for i in weights[0].argmax(axis=-1).tolist()]
    print(f"each query fetches most from: {', '.join(picked)}")
    loss = fetched.sum()
    with open(graph_path, "w") as file:
        file.write(to_dot(loss, {queries: "queries"}))
    print(f"wrote {graph_path}: the graph of that attention call (render it: dot -Tsvg {graph_path} > graph.svg)")


def fit_sine(args):
    rng = ta.Generator(args.seed)
    points = [2.0 * i / 255 - 1.0 for i in range(256)]
    x = ta.tensor([[p] for p in points], device=args.device)
    y = ta.tensor([[math.sin(3.0 * p)] for p in points], device=args.device)
    w1 = ta.randn(1, args.hidden, generator=rng, device=args.device, requires_grad=True)
    b1 = ta.zeros(args.hidden, device=args.device, requires_grad=True)
    w2 = (ta.randn(args.hidden, 1, generator=rng, device=args.device) * (1.0 / math.sqrt(args.hidden))).detach().requires_grad_()
    b2 = ta.zeros(1, device=args.device, requires_grad=True)
    params = [w1, b1, w2, b2]
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="fit sin(3x)", unit="step")
    for step in progress:
        prediction = (x @ w1 + b1).tanh() @ w2 + b2
        loss = ((prediction - y) ** 2).mean()
        for p in params:
            p.grad = None
        loss.backward()
        with ta.no_grad():
            for p in params:
                p.data -= args.lr * p.grad.data
        if step % 50 == 0 or step == args.steps - 1:
            progress.set_postfix(loss=f"{loss.item():.5f}")
    progress.close()
    print(f"final mean squared error {loss.item():.5f} after {args.steps} steps in {time.perf_counter() - start:.1f} s")
    return loss.item()


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.device is not None:
            ta.set_default_device(args.device)
        show_gradient_check()
        show_attention_map(args.graph)
        fit_sine(args)
    except ta.DeviceError as error:  # also a bad TINYATTN_DEVICE, found at the first tensor
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
