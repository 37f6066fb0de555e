"""The GPU backend checked on an NVIDIA card in one go (under 8 minutes on an H100 or H200).

    python benchmarks/gpu_check.py [--skip-suite --skip-train --skip-torch --tiny --out PATH]

1. The test suite's CUDA cases: `python -m pytest -q -k cuda tests`, passed and failed counted.
2. Parity: train.py's default model with the same weights and batch on cpu and cuda: the
   loss and every gradient within relative 1e-4 (float32), then 20 training steps whose
   losses stay together.
3. `python train.py --device cuda` on the default task until 99% exact-match: wall time, steps.
4. A GPU-sized model (d_model 512, 6+6 layers, d_ff 2048, batch 64, lengths up to 64):
   the training step on cuda against the same step on the cpu (NumPy: fewer steps, it is
   slow) and against benchmarks/twin.py's PyTorch twin on cuda, where PyTorch sees a GPU;
   the TFLOP/s each reaches against the card's own float32 matrix-product rate.

Prints a table last and writes benchmarks/results/gpu_check.json (the card, driver, CUDA,
CuPy, NumPy and PyTorch versions with the figures). Exits 1 when a check fails.
--tiny shrinks every model and count so that a test runs the whole script in seconds.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import common
import tinyattn as ta
from models import build_model
from models.training import Run, forward_backward, sharded_backward_for
from tinyattn import backend, optim
from tinyattn.parallel import ShardedBackward

PARITY_TOLERANCE = 1e-4
# Over 20 steps the devices' rounding differences compound (each step starts from the
# weights the last one left), so the losses of a run get a looser bound than one step's.
STEPS_LOSS_TOLERANCE = 1e-3
# The k-projection biases' gradients are zero in exact arithmetic; dividing their noise by
# their own size would compare noise with noise, so a gradient's size counts as at least this.
GRADIENT_FLOOR = 1e-4
SUITE_TIMEOUT_S = 240
TRAIN_TIMEOUT_S = 240
DISTINCT_BATCHES = 8

PARITY_CONFIG = common.REFERENCE
GPU_SIZED = common.REFERENCE.replace(d_model=512, heads=8, layers=6, d_ff=2048, batch_size=64, max_len=64)
FULL_COUNTS = {"parity_steps": 20, "cuda_warmup": 3, "cuda_steps": 20, "cpu_warmup": 1, "cpu_steps": 3, "matmul_n": 8192}
TINY_PARITY_CONFIG = common.REFERENCE.replace(d_model=16, heads=2, layers=1, d_ff=32, batch_size=8, max_len=6)
TINY_GPU_SIZED = common.REFERENCE.replace(d_model=32, heads=2, layers=1, d_ff=64, batch_size=8, max_len=8)
TINY_COUNTS = {"parity_steps": 3, "cuda_warmup": 1, "cuda_steps": 2, "cpu_warmup": 1, "cpu_steps": 1, "matmul_n": 128}


def synchronizer(device):
    """A function that waits for the device to finish its queued work: GPU kernels run
    asynchronously, so a timed region ends only once they have."""
    if device == "cpu":
        return lambda: None
    device_handle = backend.module_for(device).cuda.Device()
    return device_handle.synchronize


def gpu_info():
    """The card and the versions under it, from CuPy's runtime and nvidia-smi."""
    cupy = backend.module_for("cuda")
    runtime = cupy.cuda.runtime
    name = runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    info = {"name": name.decode() if isinstance(name, bytes) else name, "cupy": cupy.__version__,
            "cuda_runtime": _cuda_version(runtime.runtimeGetVersion()),
            "driver_cuda": _cuda_version(runtime.driverGetVersion()), "driver": None,
            "cupy_tf32": os.environ.get("CUPY_TF32")}  # CuPy's float32 products use TF32 only when this is 1
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.splitlines()[0].strip() if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass  # the driver's version stays unknown; the rest still identifies the machine
    return info


def _cuda_version(number):
    """CUDA's version integer (12080) as text (12.8)."""
    return f"{number // 1000}.{number % 1000 // 10}"


# --- 1. the suite's CUDA cases ---------------------------------------------------------

def pytest_counts(output):
    """{'passed': 12, 'failed': 1, ...} from the summary line pytest -q prints last."""
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return {word if word != "error" else "errors": int(count) for count, word in
            re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary)}


def run_suite():
    command = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests"]
    print(f"suite: {' '.join(command[1:])} ...", flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "timed_out": True, "seconds": SUITE_TIMEOUT_S, "counts": {}}
    counts = pytest_counts(result.stdout)
    ok = result.returncode == 0 and counts.get("passed", 0) > 0
    if not ok:
        print("\n".join(result.stdout.splitlines()[-30:]), result.stderr[-2000:], sep="\n")
    return {"ok": ok, "timed_out": False, "returncode": result.returncode, "seconds": time.perf_counter() - start,
            "counts": counts}


# --- 2. parity -------------------------------------------------------------------------

def relative_difference(reference, other, floor=0.0):
    """max |reference - other| over max(max |reference|, floor), on host copies."""
    return float(abs(reference - other).max() / max(float(abs(reference).max()), floor))


def gradients_on(device, config, task):
    """The first batch's loss, and every parameter's gradient as (name, host array), on `device`."""
    model = build_model(config, task.vocab_size, device=device)
    params = model.parameters()
    batch = next(task.batches(config.batch_size, config.seed, device=device))
    loss, _ = forward_backward(model, params, batch, ShardedBackward(1))
    return loss.item(), [(name, p.grad.numpy()) for name, p in model.named_parameters()]


def parity(config, steps, device="cuda"):
    """The same model, weights and batches on the cpu and on `device`: the first batch's loss
    and gradients, then `steps` training steps (one thread on the cpu, so that the only
    difference is the device's arithmetic)."""
    task = common.task_for(config)
    cpu_loss, cpu_grads = gradients_on("cpu", config, task)
    device_loss, device_grads = gradients_on(device, config, task)
    gradient_errors = {name: relative_difference(cpu, other, GRADIENT_FLOOR)
                       for (name, cpu), (_, other) in zip(cpu_grads, device_grads)}
    runs = [Run(config.replace(device=d, threads=1)) for d in ("cpu", device)]
    losses = [[run.train_step()[0] for _ in range(steps)] for run in runs]
    step_errors = [abs(a - b) / abs(a) for a, b in zip(*losses)]
    loss_error = abs(cpu_loss - device_loss) / abs(cpu_loss)
    worst = max(gradient_errors, key=gradient_errors.get)
    return {"ok": loss_error <= PARITY_TOLERANCE and gradient_errors[worst] <= PARITY_TOLERANCE
            and max(step_errors) <= STEPS_LOSS_TOLERANCE,
            "loss_cpu": cpu_loss, "loss_device": device_loss, "loss_relative_difference": loss_error,
            "max_gradient_relative_difference": gradient_errors[worst], "worst_gradient": worst,
            "gradients_compared": len(gradient_errors), "steps": steps, "step_losses_cpu": losses[0],
            "step_losses_device": losses[1], "max_step_loss_relative_difference": max(step_errors)}


# --- 3. train.py on cuda -----------------------------------------------------------------

def train_result(output):
    """Exact-match, whether it reached the target, steps and train.py's own wall time, from
    the lines it prints after training."""
    held_out = re.search(r"^held-out .*exact-match ([\d.]+)%", output, re.MULTILINE)
    target = re.search(r"^(reached|did not reach) the target", output, re.MULTILINE)
    steps = re.search(r"^steps (\d+), wall time ([\d.]+) s", output, re.MULTILINE)
    if not (held_out and target and steps):
        return None
    return {"exact_match": float(held_out.group(1)) / 100, "reached_target": target.group(1) == "reached",
            "steps": int(steps.group(1)), "train_wall_s": float(steps.group(2))}


def run_train():
    with tempfile.TemporaryDirectory() as folder:  # its checkpoint is not worth keeping
        command = [sys.executable, "train.py", "--device", "cuda", "--out", folder]
        print("train: python train.py --device cuda ...", flush=True)
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"ok": False, "timed_out": True, "process_wall_s": TRAIN_TIMEOUT_S}
    figures = train_result(result.stdout) or {}
    ok = result.returncode == 0 and figures.get("reached_target", False)
    if not ok:
        print(result.stdout[-2000:], result.stderr[-2000:], sep="\n")
    return {"ok": ok, "timed_out": False, "returncode": result.returncode,
            "process_wall_s": time.perf_counter() - start, **figures}


# --- 4. the GPU-sized benchmark ------------------------------------------------------------

def timed_steps(step, count, synchronize):
    """`count` calls of step(i), each timed from an idle device until its work is done."""
    seconds = []
    for i in range(count):
        synchronize()
        start = time.perf_counter()
        step(i)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def tinyattn_side(config, task, device, warmup, steps):
    """The training step as train.py takes it on `device` (its threads per step), on
    pre-made batches; returns the model, the step times and the batches used."""
    model = build_model(config, task.vocab_size, device=device)
    params = model.parameters()
    optimizer = optim.Adam(params, lr=config.lr)
    sharded = sharded_backward_for(config.replace(device=device))
    stream = task.batches(config.batch_size, config.seed, device=device)
    batches = [next(stream) for _ in range(DISTINCT_BATCHES)]

    def step(i):
        optimizer.zero_grad()
        forward_backward(model, params, batches[i % len(batches)], sharded)
        optimizer.step()

    synchronize = synchronizer(device)
    timed_steps(step, warmup, synchronize)  # the first steps compile the GPU's kernels
    return model, timed_steps(lambda i: step(warmup + i), steps, synchronize), batches


def torch_side(torch, model, batches, warmup, steps, lr):
    """benchmarks/twin.py's PyTorch twin of `model` (its weights) on the GPU, the same batches."""
    from twin import Seq2SeqTwin, batch_tensors
    twin = Seq2SeqTwin.from_tinyattn(model).to("cuda")
    optimizer = torch.optim.Adam(twin.parameters(), lr=lr)
    tensors = [tuple(t.to("cuda") for t in batch_tensors(batch)) for batch in batches]

    def step(i):
        loss = twin.loss(*tensors[i % len(tensors)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    timed_steps(step, warmup, torch.cuda.synchronize)
    return timed_steps(lambda i: step(warmup + i), steps, torch.cuda.synchronize)


def matmul_tflops(n, device="cuda", repeats=10):
    """The device's float32 n x n @ n x n rate in TFLOP/s: the reference for what a model's
    matrix products could reach."""
    xp = backend.module_for(device)
    rng = ta.Generator(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype="float32")) for _ in range(2))
    synchronize = synchronizer(device)
    a @ b  # untimed: loads cuBLAS and picks its kernel
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def benchmark(config, counts, torch, device="cuda"):
    task = common.task_for(config)
    print(f"benchmark: d_model {config.d_model}, {config.layers}+{config.layers} layers, d_ff {config.d_ff}, "
          f"batch {config.batch_size}, lengths up to {config.max_len} ...", flush=True)
    reference = matmul_tflops(counts["matmul_n"], device)
    model, device_times, batches = tinyattn_side(config, task, device, counts["cuda_warmup"], counts["cuda_steps"])
    _, cpu_times, _ = tinyattn_side(config, task, "cpu", counts["cpu_warmup"], counts["cpu_steps"])
    flops = [common.training_step_flops(batch, config, task.vocab_size) for batch in batches]

    def side(times, offset, on_gpu=True):  # offset: the index of the first timed batch, after the warm-up steps
        rates = [flops[(offset + i) % len(flops)] / t / 1e12 for i, t in enumerate(times)]
        achieved = common.median(rates)
        return {"steps": len(times), "median_step_ms": common.median(times) * 1e3, "achieved_tflops": achieved,
                "achieved_over_matmul": achieved / reference if on_gpu else None}

    sides = {f"tinyattn {device}": side(device_times, counts["cuda_warmup"]),
             "tinyattn cpu": side(cpu_times, counts["cpu_warmup"], on_gpu=False)}
    if torch is not None:
        torch_times = torch_side(torch, model, batches, counts["cuda_warmup"], counts["cuda_steps"], config.lr)
        sides["torch cuda"] = side(torch_times, counts["cuda_warmup"])
    device_ms = sides[f"tinyattn {device}"]["median_step_ms"]
    return {"sides": sides, "matmul_n": counts["matmul_n"], "matmul_float32_tflops": reference,
            "median_step_gflop": common.median(flops) / 1e9,
            "cpu_over_device_step": sides["tinyattn cpu"]["median_step_ms"] / device_ms,
            "device_over_torch_step": device_ms / sides["torch cuda"]["median_step_ms"] if torch is not None else None}


def torch_with_cuda(skip):
    """torch where it is installed and sees a GPU, else None with the reason printed."""
    torch = common.torch_or_none(skip)
    if torch is not None and not torch.cuda.is_available():
        print(f"PyTorch {torch.__version__} sees no GPU: skipping the PyTorch side")
        return None
    return torch


# --- the report ----------------------------------------------------------------------------

def summary_rows(figures):
    rows = []
    suite = figures["suite"]
    if suite is not None:
        counts = suite["counts"]
        rows.append(["cuda tests", f"timed out after {SUITE_TIMEOUT_S} s" if suite["timed_out"] else
                     f"{counts.get('passed', 0)} passed, {counts.get('failed', 0) + counts.get('errors', 0)} failed"])
    check = figures["parity"]
    rows += [["parity: loss, relative difference", f"{check['loss_relative_difference']:.1e} (limit {PARITY_TOLERANCE:.0e})"],
             [f"parity: worst of {check['gradients_compared']} gradients", f"{check['max_gradient_relative_difference']:.1e} "
              f"({check['worst_gradient']}; limit {PARITY_TOLERANCE:.0e})"],
             [f"parity: losses over {check['steps']} steps", f"{check['max_step_loss_relative_difference']:.1e} "
              f"(limit {STEPS_LOSS_TOLERANCE:.0e})"]]
    train = figures["train"]
    if train is not None:
        if train["timed_out"]:
            result = f"timed out after {TRAIN_TIMEOUT_S} s"
        elif "steps" not in train:
            result = f"no result (exit status {train['returncode']})"
        else:
            result = (f"{train['exact_match']:.1%} exact-match after {train['steps']} steps, {train['train_wall_s']:.1f} s "
                      f"({train['process_wall_s']:.1f} s with start-up)")
        rows.append(["train.py --device cuda", result])
    bench = figures["benchmark"]
    for name, side in bench["sides"].items():
        share = f", {side['achieved_over_matmul']:.0%} of matmul" if side["achieved_over_matmul"] is not None else ""
        rows.append([f"step: {name}", f"{side['median_step_ms']:.1f} ms, {side['achieved_tflops']:.2f} TFLOP/s{share}"])
    rows.append([f"float32 matmul n={bench['matmul_n']}", f"{bench['matmul_float32_tflops']:.2f} TFLOP/s"])
    rows.append(["cpu step / cuda step", f"{bench['cpu_over_device_step']:.1f}"])
    if bench["device_over_torch_step"] is not None:
        rows.append(["tinyattn cuda step / torch cuda step", f"{bench['device_over_torch_step']:.2f}"])
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-suite", action="store_true", help="do not run the test suite's CUDA cases")
    parser.add_argument("--skip-train", action="store_true", help="do not run python train.py --device cuda")
    parser.add_argument("--skip-torch", action="store_true", help="benchmark tinyattn only")
    parser.add_argument("--tiny", action="store_true", help="tiny models and counts: the whole script in seconds, for a test")
    common.add_out_argument(parser, "gpu_check")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch = torch_with_cuda(args.skip_torch)
    machine = common.start()
    try:
        machine["gpu"] = gpu_info()
    except ta.DeviceError as error:  # no CuPy or no GPU: the message says which, and what to do
        print(f"gpu_check.py: error: {error}", file=sys.stderr)
        return 2
    print(f"gpu: {machine['gpu']['name']}, driver {machine['gpu']['driver']} (CUDA {machine['gpu']['driver_cuda']}), "
          f"CuPy {machine['gpu']['cupy']} (CUDA runtime {machine['gpu']['cuda_runtime']})", flush=True)
    parity_config, gpu_sized, counts = ((TINY_PARITY_CONFIG, TINY_GPU_SIZED, TINY_COUNTS) if args.tiny
                                        else (PARITY_CONFIG, GPU_SIZED, FULL_COUNTS))
    figures = {"suite": None if args.skip_suite else run_suite()}
    print(f"parity: cpu and cuda, {counts['parity_steps']} training steps ...", flush=True)
    figures["parity"] = parity(parity_config, counts["parity_steps"])
    figures["train"] = None if args.skip_train else run_train()
    figures["benchmark"] = benchmark(gpu_sized, counts, torch)
    settings = {"tiny": args.tiny, "parity_config": parity_config.to_dict(), "benchmark_config": gpu_sized.to_dict(),
                "counts": counts, "distinct_batches": DISTINCT_BATCHES, "parity_tolerance": PARITY_TOLERANCE,
                "steps_loss_tolerance": STEPS_LOSS_TOLERANCE, "gradient_floor": GRADIENT_FLOOR,
                "torch": torch is not None,
                "torch_float32_matmul_precision": torch.get_float32_matmul_precision() if torch is not None else None}
    common.write_results("gpu_check", machine, settings, figures, args.out)
    print()
    common.table(["check", "result"], summary_rows(figures))
    failed = [name for name in ("suite", "parity", "train") if figures[name] is not None and not figures[name]["ok"]]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
