"""Fixtures shared by the test modules."""
import pytest

from tinyattn import kernels


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
