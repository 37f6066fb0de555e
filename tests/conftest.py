"""Fixtures shared by the test modules.

A test runs on both devices by taking the `device` argument (it is then run twice, with ids
test_x[cpu] and test_x[cuda]); a module whose tests all do says so once, with
`pytestmark = pytest.mark.usefixtures("device")`. Tensors made without a device, from
Python data or numpy arrays, go to the default device, which the fixture sets. Without a
GPU, "cuda" runs on tests/cupy_standin.py.
"""
import functools

import pytest

import cupy_standin
import tinyattn
from tinyattn import backend, kernels


@functools.cache
def real_cuda_available():
    """Whether CuPy with a GPU is usable here, asked once, before any test installs the stand-in."""
    return backend.cuda_available()


@pytest.fixture(params=backend.DEVICES)
def device(request):
    """Runs the test on each device, that device the default for the test. "cuda" is the GPU
    where CuPy has one, else the CuPy stand-in, installed for this test only: tests of the
    no-CuPy error messages, outside this fixture, still see no CuPy."""
    stand_in = request.param == "cuda" and not real_cuda_available()
    if stand_in:
        backend._use_cuda_module(cupy_standin, cupy_standin.cupyx)
    previous = tinyattn.get_default_device()
    tinyattn.set_default_device(request.param)
    try:
        yield request.param
    finally:
        tinyattn.set_default_device(previous)
        if stand_in:
            backend._use_cuda_module(None, None)


@pytest.fixture
def sync_counter(device):
    """An object whose .count is the number of device-to-host synchronisations the test has made
    so far; counted on the CuPy stand-in only (the cpu case, and a real GPU, are skipped)."""
    if device == "cpu":
        pytest.skip("host arrays need no synchronisation")
    if real_cuda_available():
        pytest.skip("synchronisations are counted on the CuPy stand-in, not on a real GPU")
    with cupy_standin.count_syncs() as counter:
        yield counter


@pytest.fixture(params=kernels.CHOICES)
def kernel_path(request):
    """Runs the test once on each kernels path ('fused', 'composed'), the test's id naming it."""
    with kernels.use(request.param):
        yield request.param


@pytest.fixture
def function_calls():
    """record(work): the class names of the Functions run (forward, and backward) while work() runs,
    one entry per call, in order, seen through the engine's op hooks."""
    from tinyattn import engine

    def record(work):
        calls = []

        def hook(phase, name, run):
            calls.append((phase, name))
            return run()

        handle = engine.add_op_hook(hook)
        try:
            work()
        finally:
            handle.remove()
        return calls

    return record
