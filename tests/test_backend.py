"""Devices: every test here runs on each available device; CUDA cases skip with the reason."""
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import backend


def _cuda_skip_reason():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'tinyattn[cuda]')"
    if not ta.cuda_available():
        return "CuPy is installed but sees no usable GPU"
    return None


CUDA_SKIP = _cuda_skip_reason()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or ""))]


@pytest.mark.parametrize("device", DEVICES)
def test_ops_and_gradients_on_device(device):
    rng = np.random.default_rng(0)
    a_host, b_host = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))
    a = ta.tensor(a_host, device=device, requires_grad=True)
    b = ta.tensor(b_host, device=device, requires_grad=True)
    out = (a @ b).tanh().sum()
    out.backward()
    assert a.device == device and a.grad.device == device
    expected = np.tanh(a_host @ b_host).sum()
    np.testing.assert_allclose(out.item(), expected, rtol=1e-10)
    assert isinstance(a.grad.numpy(), np.ndarray)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_on_device(device):
    rng = np.random.default_rng(1)
    x = ta.tensor(rng.standard_normal((3, 4)), device=device, requires_grad=True)
    assert ta.gradcheck(lambda x: (x.exp() * x).sum(axis=1), [x])


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_random_tensors_are_the_same_on_every_device(device):
    values = ta.randn(5, generator=ta.Generator(3), device=device).numpy()
    np.testing.assert_array_equal(values, ta.randn(5, generator=ta.Generator(3), device="cpu").numpy())


@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
def test_mixing_cpu_and_cuda_names_both_devices():
    with pytest.raises(ta.DeviceError, match="cpu and cuda"):
        ta.ones(2) + ta.ones(2, device="cuda")


@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
def test_to_moves_data_and_gradient_back():
    x = ta.tensor([1.0, 2.0], requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda"
    (y * y).sum().backward()
    assert x.grad.device == "cpu"
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])


@pytest.mark.skipif(CUDA_SKIP is None, reason="this machine has a usable GPU")
def test_asking_for_cuda_without_a_gpu_says_how_to_install():
    with pytest.raises(ta.DeviceError, match=r"pip install '\.\[cuda12\]', or pip install '\.\[cuda13\]' where nvidia-smi"):
        ta.zeros(2, device="cuda")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ta.DeviceError, match="unknown device 'tpu'"):
        ta.zeros(2, device="tpu")


def test_mixed_device_check_in_apply_names_both_devices():
    # Without a GPU, stand in for a foreign array type to exercise the same check.
    class FakeDeviceArray(np.ndarray):
        pass

    a = ta.tensor([1.0])
    b = ta.Tensor._from_array(np.asarray([1.0], dtype=np.float32).view(FakeDeviceArray))
    with pytest.raises(ta.DeviceError, match="different devices"):
        a + b


def test_default_device_follows_set_default_device():
    assert ta.get_default_device() == "cpu"
    ta.set_default_device("cpu")
    assert ta.zeros(1).device == "cpu"


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_importing_tinyattn_does_not_import_cupy():
    result = _run_python("import sys, tinyattn; tinyattn.ones(2) * 2; print('cupy' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_tinyattn_device_environment_variable_sets_the_default():
    result = _run_python("import tinyattn; print(tinyattn.zeros(1).device)", TINYATTN_DEVICE="cpu")
    assert result.stdout.strip() == "cpu"
    if CUDA_SKIP is not None:
        result = _run_python("import tinyattn; tinyattn.zeros(1)", TINYATTN_DEVICE="cuda")
        assert result.returncode != 0 and "'.[cuda12]'" in result.stderr


# checkpoint.py reads and writes NumPy's .npz file format, on host copies of the arrays.
MAY_IMPORT_NUMPY = {"backend.py", "checkpoint.py"}


def test_only_the_backend_module_imports_numpy_or_cupy():
    package = Path(ta.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        name = str(path.relative_to(package))
        if name not in MAY_IMPORT_NUMPY:
            for line in path.read_text().splitlines():
                if line.lstrip().startswith(("import numpy", "from numpy", "import cupy", "from cupy")):
                    offenders.append(f"{name}: {line.strip()}")
    assert offenders == []


def test_backend_to_device_round_trip_on_cpu():
    array = np.arange(3.0)
    assert backend.to_device(array, "cpu") is array
    assert backend.device_of(array) == "cpu"
