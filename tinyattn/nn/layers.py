"""The basic layers: Linear, Embedding, LayerNorm, Dropout and the activations."""
import math
import numbers

from .. import backend, functional as F
from ..creation import default_generator, empty_parameter_data
from . import init
from .module import Module, Parameter


class Linear(Module):
    """y = x @ weight.T + bias, weight of shape (out_features, in_features) as in PyTorch.

    Weights and bias start uniform in +-1/sqrt(in_features), PyTorch's default.
    """

    def __init__(self, in_features, out_features, bias=True, generator=None, device=None, dtype=backend.float32):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = init.uniform_(Parameter(empty_parameter_data((out_features, in_features), dtype, device)), -bound, bound, generator)
        self.bias = init.uniform_(Parameter(empty_parameter_data((out_features,), dtype, device)), -bound, bound, generator) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A table of `num_embeddings` vectors of size `embedding_dim`, looked up by integer id."""

    def __init__(self, num_embeddings, embedding_dim, generator=None, device=None, dtype=backend.float32):
        super().__init__()
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(f"Embedding needs positive sizes, got {num_embeddings} x {embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = init.normal_(Parameter(empty_parameter_data((num_embeddings, embedding_dim), dtype, device)), 0.0, 1.0, generator)

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalises the last axes, then scales and shifts them (tinyattn.kernels.layer_norm).

    normalized_shape: an int (the last axis) or a tuple or list of the last axes' sizes, as
    in PyTorch, which keeps it as a tuple; weight and bias have that shape. Several axes are
    normalised as one, flattened to a last axis of their product.
    """

    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=backend.float32):
        super().__init__()
        shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (normalized_shape,)
        if not all(isinstance(n, numbers.Integral) for n in shape):
            raise TypeError(f"LayerNorm: normalized_shape must be an int or a tuple or list of ints, got {normalized_shape!r}")
        if not shape or not all(n > 0 for n in shape):
            raise ValueError(f"LayerNorm: normalized_shape must be positive sizes, at least one, got {normalized_shape!r}")
        self.normalized_shape, self.eps = tuple(int(n) for n in shape), eps
        self.weight = init.ones_(Parameter(empty_parameter_data(self.normalized_shape, dtype, device)))
        self.bias = init.zeros_(Parameter(empty_parameter_data(self.normalized_shape, dtype, device)))

    def forward(self, x):
        axes = len(self.normalized_shape)
        if x.shape[-axes:] != self.normalized_shape:
            raise ValueError(f"LayerNorm({self.normalized_shape}) needs input of shape (..., "
                             f"{', '.join(map(str, self.normalized_shape))}), got {x.shape}")
        if axes == 1:
            return F.layer_norm(x, self.weight, self.bias, self.eps)
        size = self.weight.size
        flat = F.layer_norm(x.reshape(*x.shape[:-axes], size), self.weight.reshape(size), self.bias.reshape(size), self.eps)
        return flat.reshape(*x.shape)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Zeroes elements with probability p while training; does nothing in eval mode."""

    def __init__(self, p=0.1, generator=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.generator = generator or default_generator()

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.generator)

    def extra_repr(self):
        return f"p={self.p}"


class ReLU(Module):
    def forward(self, x):
        return x.relu()


class GELU(Module):
    def forward(self, x):
        return x.gelu()
