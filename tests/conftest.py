"""Fixtures shared by the test modules."""
import pytest

from tinyattn import kernels


@pytest.fixture(params=kernels.CHOICES)
def kernel_path(request):
    """Runs the test once on each kernels path ('fused', 'composed'), the test's id naming it."""
    with kernels.use(request.param):
        yield request.param
