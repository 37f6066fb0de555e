"""The same code on both devices: cpu and cuda agree, and train.py runs end to end on cuda.

"cuda" is a real GPU where CuPy has one, else the CuPy stand-in (tests/conftest.py).
Each test compares cuda with cpu, so it runs once, as [cuda].
"""
import re

import numpy as np
import pytest

from models.config import Config
from models.training import Run
from test_train import TINY, run_main
from tinyattn import backend, checkpoint

SMALL = dict(task="reverse", vocab=6, min_len=1, max_len=6, d_model=16, heads=2, layers=1, d_ff=32, batch_size=8,
             warmup=5, threads=1)
FLOAT32_AGREEMENT = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture
def cuda(device):
    if device == "cpu":
        pytest.skip("compares cuda with cpu: runs as [cuda]")
    return device


@pytest.mark.parametrize("model", ["transformer", "gpt", "rnn-attention"])
@pytest.mark.parametrize("kernels", ["fused", "composed"])
def test_cpu_and_cuda_agree_on_the_loss_and_every_gradient_for_20_steps(cuda, model, kernels):
    runs = {device: Run(Config(**SMALL, model=model, kernels=kernels, device=device)) for device in ("cpu", cuda)}
    for on_cpu, on_cuda in zip(runs["cpu"].params, runs[cuda].params):  # the same initial weights, drawn on the host
        np.testing.assert_array_equal(on_cuda.numpy(), on_cpu.numpy())
    initial = [param.numpy().copy() for param in runs["cpu"].params]  # .numpy() of a cpu tensor is its live array
    for step in range(20):
        losses = {device: run.train_step()[0] for device, run in runs.items()}
        assert losses[cuda] == pytest.approx(losses["cpu"], rel=1e-4), f"step {step + 1}"
        if step == 0:
            for on_cpu, on_cuda in zip(runs["cpu"].params, runs[cuda].params):
                assert on_cuda.device == cuda
                np.testing.assert_allclose(on_cuda.grad.numpy(), on_cpu.grad.numpy(), **FLOAT32_AGREEMENT)
    # 20 Adam steps later the weights are still together: apart by under 5% of how far they moved
    # (Adam divides by the gradient's running size, so a parameter whose gradient is near 0 magnifies rounding).
    apart = max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(runs["cpu"].params, runs[cuda].params))
    moved = max(np.abs(param.numpy() - start).max() for param, start in zip(runs["cpu"].params, initial))
    assert apart < 0.05 * moved, (apart, moved)


def test_dropout_masks_are_the_same_on_both_devices(cuda):
    runs = {device: Run(Config(**SMALL, dropout=0.2, device=device)) for device in ("cpu", cuda)}
    losses = {device: [run.train_step()[0] for _ in range(3)] for device, run in runs.items()}
    np.testing.assert_allclose(losses[cuda], losses["cpu"], rtol=1e-4)


def test_train_py_trains_saves_resumes_across_devices_and_decodes_on_cuda(cuda, tmp_path):
    flags = [*TINY, "--eval-every", "10", "--target-accuracy", "1.0"]
    path = tmp_path / "run" / "checkpoint.npz"
    code, stdout, stderr = run_main([*flags, "--steps", "30", "--device", cuda, "--out", tmp_path / "run"])
    assert code == 0, stderr
    assert "parameters; cuda, " in stdout and "steps 30," in stdout
    assert checkpoint.load(path)["step"] == 30
    for device, steps in (("cpu", 40), (cuda, 50)):  # a cuda checkpoint resumed on the cpu, and back
        code, stdout, stderr = run_main(["--resume", path, "--steps", str(steps), "--device", device])
        assert code == 0, stderr
        assert f"parameters; {device}, " in stdout and f"steps {steps}," in stdout
        assert checkpoint.load(path)["step"] == steps
    svg = tmp_path / "attention.svg"
    code, stdout, stderr = run_main(["--checkpoint", path, "--device", cuda, "--decode", "1 2 3", "--svg", svg])
    assert code == 0, stderr
    assert re.match(r"1 2 3 -> [0-3 ]+ (✓|✗ expected 1 2 3) \(copy\)$", stdout.splitlines()[0])
    assert "cross-attention, layer 1, head 1" in stdout and svg.read_text().startswith("<svg")


def test_random_draws_are_made_on_the_device_and_equal_the_hosts(cuda):
    on_host = backend.uniform_on("cpu", (2, 5000), backend.generator(3))
    on_device = backend.uniform_on(cuda, (2, 5000), backend.generator(3))
    assert backend.device_of(on_device) == cuda
    np.testing.assert_array_equal(backend.to_host(on_device), on_host)
    assert 0.0 <= on_host.min() and on_host.max() < 1.0
    assert abs(on_host.mean() - 0.5) < 0.01 and abs(on_host.std() - 12 ** -0.5) < 0.01  # uniform: sd 1/sqrt(12)
    generator = backend.generator(3)
    assert not np.array_equal(backend.uniform_on("cpu", (5,), generator), backend.uniform_on("cpu", (5,), generator))
