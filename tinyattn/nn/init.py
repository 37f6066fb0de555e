"""In-place initialisers for parameters, each drawing from a seeded generator.

Values are drawn on the host and then copied to the parameter's device, so the same
seed gives the same weights on CPU and GPU.
"""
import math

from .. import backend
from ..creation import default_generator


def _fill(tensor, host_values):
    tensor.data[...] = backend.to_device(host_values.astype(tensor.dtype), tensor.device)
    return tensor


def _fans(tensor):
    if tensor.ndim < 2:
        raise ValueError(f"fan-in and fan-out need a tensor with at least 2 dimensions, got shape {tensor.shape}")
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def uniform_(tensor, low=0.0, high=1.0, generator=None):
    return _fill(tensor, (generator or default_generator()).uniform(low, high, tensor.shape))


def normal_(tensor, mean=0.0, std=1.0, generator=None):
    return _fill(tensor, (generator or default_generator()).normal(mean, std, tensor.shape))


def xavier_uniform_(tensor, gain=1.0, generator=None):
    """Glorot: U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out)), keeping activations' variance steady."""
    fan_in, fan_out = _fans(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator)


def zeros_(tensor):
    tensor.data[...] = 0
    return tensor


def ones_(tensor):
    tensor.data[...] = 1
    return tensor
