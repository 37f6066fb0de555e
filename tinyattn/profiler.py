"""Where a step's time goes: per op type, forward and backward, and the share inside matrix products.

Switch it on for any program with the environment variable TINYATTN_PROFILE=1 (the
report goes to stderr when the program exits), or around a piece of code:

    with tinyattn.profiler.profile() as report:
        ...train a few steps...
    print(report.table(steps=20))

Each op's time is measured around its Function's forward, and around its backward
during backward(); ops that a backward rule runs count toward that rule, so nothing is
counted twice. Matrix products (every GEMM the ops run goes through backend.matmul)
are timed on their own: their share of the wall time is the part spent in BLAS, the
rest is NumPy's elementwise work plus Python (model code, the engine, the optimizer).
"""
import atexit
import contextlib
import math
import os
import sys
import time
from collections import defaultdict

from . import backend, engine


def matmul_flops(a_shape, b_shape):
    """Floating-point operations (2 per multiply-add) of a @ b for operands of these shapes,
    stacked (batched) products and matrix-vector products included."""
    m = a_shape[-2] if len(a_shape) > 1 else 1
    n = b_shape[-1] if len(b_shape) > 1 else 1
    k = a_shape[-1]
    stacked = max(math.prod(a_shape[:-2]), math.prod(b_shape[:-2]))
    return 2.0 * stacked * m * k * n


class Profile:
    """Timings gathered while profiling was on."""

    def __init__(self):
        self.forward = defaultdict(lambda: [0, 0.0])   # op name -> [calls, seconds]
        self.backward = defaultdict(lambda: [0, 0.0])
        self.regions = defaultdict(lambda: [0, 0.0])   # e.g. the optimizer step
        self.gemm = [0, 0.0, 0.0]                      # calls, seconds, floating-point operations
        self.depth = 0
        self.started = time.perf_counter()
        self.stopped = None

    def time_op(self, phase, name, run):
        """The engine's op hook (engine.add_op_hook): run the op, charging its time to `name`
        in the forward or backward table unless an enclosing op is already being timed."""
        if self.depth:
            return run()
        self.depth += 1
        start = time.perf_counter()
        try:
            return run()
        finally:
            entry = (self.forward if phase == "forward" else self.backward)[name]
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            self.depth -= 1

    def observe_gemm(self, a, b, seconds):
        self.gemm[0] += 1
        self.gemm[1] += seconds
        self.gemm[2] += matmul_flops(a.shape, b.shape)

    def wall(self):
        return (self.stopped or time.perf_counter()) - self.started

    def table(self, steps=None):
        """The report as text; with `steps`, times are also given per step."""
        per = f"per step ({steps} steps)" if steps else "total"
        scale = 1e3 / steps if steps else 1e3
        names = sorted(set(self.forward) | set(self.backward),
                       key=lambda n: -(self.forward[n][1] + self.backward[n][1]))
        lines = [f"{'op':<28} {'fwd calls':>9} {'fwd ms':>9} {'bwd calls':>9} {'bwd ms':>9}   ({per})"]
        in_ops = 0.0
        for name in names:
            (fc, fs), (bc, bs) = self.forward[name], self.backward[name]
            in_ops += fs + bs
            lines.append(f"{name:<28} {fc:>9} {fs * scale:>9.2f} {bc:>9} {bs * scale:>9.2f}")
        for name, (calls, seconds) in self.regions.items():
            lines.append(f"{name:<28} {calls:>9} {seconds * scale:>9.2f}")
        wall = self.wall()
        regions = sum(seconds for _, seconds in self.regions.values())
        calls, gemm_seconds, flops = self.gemm
        rate = flops / gemm_seconds / 1e9 if gemm_seconds else 0.0
        lines += [
            "",
            f"wall time profiled       {wall * scale:9.2f} ms",
            f"inside ops               {in_ops * scale:9.2f} ms  ({in_ops / wall:.0%})",
            f"  of which GEMMs (BLAS)  {gemm_seconds * scale:9.2f} ms  ({gemm_seconds / wall:.0%} of wall; {calls} calls, {rate:.0f} GFLOP/s)",
            f"optimizer and regions    {regions * scale:9.2f} ms  ({regions / wall:.0%})",
            f"outside (Python: model code, graph walk, data)  {(wall - in_ops - regions) * scale:9.2f} ms  "
            f"({(wall - in_ops - regions) / wall:.0%})",
        ]
        return "\n".join(lines)


_active = None  # the Profile being filled, and the handles of its hooks


def start():
    """Begin profiling; returns the Profile being filled."""
    global _active
    report = Profile()
    _active = (report, engine.add_op_hook(report.time_op), backend.add_matmul_hook(report.observe_gemm))
    return report


def stop(report):
    global _active
    report.stopped = time.perf_counter()
    if _active is not None and _active[0] is report:
        for handle in _active[1:]:
            handle.remove()
        _active = None
    return report


def is_active():
    return _active is not None


@contextlib.contextmanager
def profile():
    report = start()
    try:
        yield report
    finally:
        stop(report)


@contextlib.contextmanager
def region(name):
    """Charge a block that is not an op (the optimizer step) to `name` while profiling."""
    if _active is None:
        yield
        return
    report = _active[0]
    report.depth += 1
    begin = time.perf_counter()
    try:
        yield
    finally:
        entry = report.regions[name]
        entry[0] += 1
        entry[1] += time.perf_counter() - begin
        report.depth -= 1


def enable_from_environment():
    """TINYATTN_PROFILE=1: profile the whole program and print the report to stderr at exit."""
    if os.environ.get("TINYATTN_PROFILE") != "1":
        return None
    report = start()

    def print_report():
        stop(report)
        print("\ntinyattn profile (TINYATTN_PROFILE=1):\n" + report.table(), file=sys.stderr)

    atexit.register(print_report)
    return report
