"""Dropout: one path for both kernels, a multiply by a keep-mask drawn on the tensor's device."""
from .. import backend
from ..creation import shard_generator
from ..ops import constant


def dropout_mask(shape, p, generator, like):
    """A keep-mask scaled by 1/(1-p), drawn on like's device from `generator` (or from the
    generator a batch shard was given: creation.shard_generator), so seeds match across devices."""
    keep = backend.uniform_on(like.device, shape, shard_generator() or generator) >= p
    return constant(keep.astype(like.dtype) * (1.0 / (1.0 - p)))


def dropout(x, p, training, generator):
    """Zero each element with probability p during training and scale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return x * dropout_mask(x.shape, p, generator, x)
