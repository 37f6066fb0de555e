"""What the benchmarks share: the reference config, machine facts, JSON results, medians, FLOP counts.

The benchmarks run as scripts (`python benchmarks/step_time.py`), so this module puts the
repository root on sys.path: they time the checkout's `models` and `tinyattn`, installed or not. It never imports torch: memory.py must not pay
for it, and every benchmark has to run where torch is absent.
"""
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy  # noqa: E402  (its version, for the record of the machine; tensors go through tinyattn)

import tinyattn as ta  # noqa: E402
from tinyattn.cpu import blas_kernels, tune_allocator  # noqa: E402
from models import Config  # noqa: E402
from models.training import Run, forward_backward  # noqa: E402
from tinyattn.tasks import SequenceTask  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# What `python train.py` trains: its defaults.
REFERENCE = Config()
# Wide enough that matrix products, not Python, should dominate the step.
COMPUTE_BOUND = REFERENCE.replace(d_model=256, layers=4, d_ff=1024, heads=4, max_len=32)


def train_run(config=REFERENCE):
    """train.py's Run for a benchmark config: its model, Adam, schedule, batch stream and
    step (the batch's shards side by side), so benchmarks time what `python train.py` does."""
    return Run(config)


def timed_train_step(model, optimizer, batch, sharded):
    """One training step as train.py takes it (zero_grad, models.training.forward_backward
    with the batch's shards side by side, the loss read once, Adam step), timed; returns (seconds, loss)."""
    start_time = time.perf_counter()
    optimizer.zero_grad()
    loss, _ = forward_backward(model, optimizer.params, batch, sharded)
    loss_value = loss.item()
    optimizer.step()
    return time.perf_counter() - start_time, loss_value


def start():
    """What every benchmark does first: tune glibc's allocator as train.py does, then print
    and return the machine facts for the results (whether the tuning applied among them).
    Import torch (torch_or_none) before this, so they record it."""
    machine = machine_info(tune_allocator())
    print_machine(machine)
    return machine


def task_for(config):
    return SequenceTask(config.task, config.vocab, config.min_len, config.max_len)


def torch_or_none(skip=False):
    """The torch module, or None with a printed reason (torch is not a dependency of tinyattn)."""
    if skip:
        print("PyTorch side skipped (--skip-torch)")
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: skipping the PyTorch side (pip install torch to compare)")
        return None
    return torch


def _package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    try:
        changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
        return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
                "uncommitted_outside_benchmarks": [p for p in changed if not p.startswith(("benchmarks/", "docs/"))]}
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(allocator_tuned=None):
    """Where the figures came from. torch is not imported here: 'torch' is the version this run used (None if
    it did not), 'torch_installed' what the package metadata says."""
    info = {"platform": platform.platform(), "processor": _cpu_model(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "numpy": numpy.__version__, "tinyattn": ta.__version__,
            "torch": None, "torch_installed": _package_version("torch"),
            "openblas_env": {name: os.environ.get(name) for name in OPENBLAS_VARIABLES}, "blas_kernels": blas_kernels(),
            "allocator_tuned": allocator_tuned, "git": _git_state()}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):  # only where this run imported (and used) it
        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def print_machine(info):
    env = ", ".join(f"{name}={value if value is not None else '(unset)'}" for name, value in info["openblas_env"].items())
    print(f"machine: {info['processor']}, {info['cpu_count']} CPUs; numpy {info['numpy']} "
          f"(OpenBLAS kernels: {info['blas_kernels'] or 'not OpenBLAS'}), torch {info['torch'] or '(not used)'}; {env}")
    print(f"glibc allocator tuned (tinyattn.cpu.tune_allocator, as train.py does): {info['allocator_tuned']}")


def quick_or_full(args, quick, full, parser):
    """An experiment's settings: `quick` with --quick, else `full`, with --steps (when given) in place of theirs."""
    settings = dict(quick if args.quick else full)
    if args.steps is not None:
        if args.steps <= 0:
            parser.error(f"--steps must be positive, got {args.steps}")
        settings["steps"] = args.steps
    return settings


def add_out_argument(parser, name):
    parser.add_argument("--out", default=os.path.join(RESULTS, f"{name}.json"),
                        help=f"where the JSON goes (default benchmarks/results/{name}.json)")


def write_results(name, machine, settings, figures, path=None):
    """The JSON record (machine, settings, figures, date), by default at benchmarks/results/<name>.json."""
    path = path or os.path.join(RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine,
              "settings": settings, "figures": figures}
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    print(f"wrote {os.path.relpath(os.path.abspath(path), ROOT)}")
    return path


def median(values):
    return statistics.median(values)


def median_ratio(numerators, denominators):
    """Median of the pairwise ratios: on a noisy machine a slow moment hits both sides of a pair alike."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def quartiles(values):
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def table(headers, rows):
    """Print a plain text table; numbers are already formatted by the caller."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


# --- FLOPs ---------------------------------------------------------------------------

def seq2seq_forward_flops(batch_size, source_length, target_length, config, vocab_size):
    """Matrix-product FLOPs (2 per multiply-add) of one Seq2SeqTransformer forward pass.

    Counted: the q/k/v/out projections, QK^T and weights @ V of every self- and
    cross-attention, both feed-forward GEMMs, and the output head, at the padded shapes
    actually computed. Not counted: embeddings, layer norms, softmax, elementwise ops.
    """
    B, S, T = batch_size, source_length, target_length
    d, f, L = config.d_model, config.d_ff, config.layers
    encoder_layer = (4 * 2 * B * S * d * d        # q, k, v, out projections
                     + 2 * 2 * B * S * S * d      # QK^T and PV over all heads
                     + 2 * 2 * B * S * d * f)     # feed-forward
    decoder_layer = (4 * 2 * B * T * d * d + 2 * 2 * B * T * T * d       # causal self-attention
                     + 2 * 2 * B * T * d * d + 2 * 2 * B * S * d * d     # cross: q, out from T; k, v from memory
                     + 2 * 2 * B * T * S * d                             # cross QK^T and PV
                     + 2 * 2 * B * T * d * f)                            # feed-forward
    head = 2 * B * T * d * vocab_size
    return L * encoder_layer + L * decoder_layer + head


def training_step_flops(batch, config, vocab_size):
    """Forward + backward matmul FLOPs of one training step on a tasks.Batch: 3x the forward
    (the backward computes a gradient for each of the two operands of every product)."""
    (B, S), T = batch.source.shape, batch.decoder_input.shape[1]
    return 3 * seq2seq_forward_flops(B, S, T, config, vocab_size)
