"""The stateless functions of networks, PyTorch's `F`: softmax, normalisation, losses, attention.

Each is defined where it is built: the kernels (tinyattn/kernels/) hold a composed
reference beside a fused Function and run one of them by the kernels switch; linear and
embedding are engine ops (tinyattn/ops.py).
"""
from .kernels.attention import attention_mask, scaled_dot_product_attention
from .kernels.cross_entropy import cross_entropy
from .kernels.dropout import dropout, dropout_mask
from .kernels.layer_norm import layer_norm
from .kernels.softmax import log_softmax, softmax
from .ops import embedding, linear

__all__ = ["attention_mask", "cross_entropy", "dropout", "dropout_mask", "embedding", "layer_norm", "linear",
           "log_softmax", "scaled_dot_product_attention", "softmax"]
