"""Layer normalisation over the last axis: (x - mean) / sqrt(var + eps) * weight + bias.

    layer_norm_composed  from engine ops (the reference)
    FusedLayerNorm       one Function; every row statistic a matrix-vector product
    layer_norm           picks one of them by the kernels switch

On the fused path layer_norm returns a DeferredLayerNorm (kernels.deferred): the norm's
output, computed only when something reads it. The fused attention and feed-forward
blocks, which in a pre-LN transformer are the only readers, take the norm's input instead
and fold its scale and shift into their first projection (rows.fold_norm), so a layer
that reads as its formula, x + attn(norm(x)), still skips writing the normalised activations.
"""
from ..engine import Function, expect_tensor
from ..ops import constant
from . import fused_selected, rows
from .deferred import Deferred


def layer_norm_composed(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    normalized = centered / (variance + eps).sqrt()
    if weight is not None:
        normalized = normalized * weight
    if bias is not None:
        normalized = normalized + bias
    return normalized


class FusedLayerNorm(Function):
    """Layer norm as one Function (reference: layer_norm_composed); weight and bias may be None.

    The backward takes the row sums of g*w and g*w*n as GEMVs with w, so that it makes
    only a few full-size passes over the data.
    """

    def forward(self, x, weight, bias, *, eps):
        self.normalized, self.inverse_std = rows.normalize_rows(self.xp, x.reshape(-1, x.shape[-1]), eps)
        self.weight, self.has_bias = weight, bias is not None
        out = self.normalized * weight if weight is not None else self.normalized.copy()
        if bias is not None:
            out += bias
        return out.reshape(x.shape)

    def backward(self, grad):
        rows.refuse_create_graph("fused layer norm")
        xp = self.xp
        g = grad.data.reshape(self.normalized.shape)
        g_times_n = g * self.normalized
        grad_weight = rows.column_sum(xp, g_times_n) if self.weight is not None else None
        grad_bias = rows.column_sum(xp, g) if self.has_bias else None
        # Without a weight the rule overwrites its gradient argument, which may be shared: give it a copy.
        grad_x = rows.normalize_rows_backward(xp, g if self.weight is not None else g.copy(), self.normalized,
                                              self.inverse_std, self.weight, g_times_n)
        return (constant(grad_x.reshape(grad.shape)), None if grad_weight is None else constant(grad_weight),
                None if grad_bias is None else constant(grad_bias))


class DeferredLayerNorm(Deferred):
    """The output of a fused layer norm, computed (by FusedLayerNorm, once) when first read
    (see kernels.deferred). A fused block that reads it through deferred_norm() gets the
    norm's input and parameters instead and folds the norm into its own projection."""

    __slots__ = ("_weight", "_bias", "_eps")

    def __init__(self, x, weight, bias, eps):
        super().__init__(x, x.shape, x.requires_grad or (weight is not None and weight.requires_grad)
                         or (bias is not None and bias.requires_grad))
        self._weight, self._bias, self._eps = weight, bias, eps

    def _make(self):
        return FusedLayerNorm.apply(self._like, self._weight, self._bias, eps=self._eps)

    def deferred_norm(self):
        """(input, weight, bias, eps) for a block to fold, or None once computed (or without scale and shift)."""
        if not self.pending or self._weight is None or self._bias is None:
            return None
        return self._like, self._weight, self._bias, self._eps


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Normalise the last axis to zero mean and unit variance, then scale by weight and shift by bias.
    Runs FusedLayerNorm (deferred: see DeferredLayerNorm) or layer_norm_composed by the kernels switch."""
    expect_tensor(x, "layer_norm's input")
    for name, parameter in (("weight", weight), ("bias", bias)):
        if parameter is not None and expect_tensor(parameter, f"layer_norm's {name}").shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} of shape {parameter.shape} does not fit input of shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"layer_norm needs a floating-point input, got dtype {x.dtype}")
    if fused_selected():
        return DeferredLayerNorm(x, weight, bias, eps)
    return layer_norm_composed(x, weight, bias, eps)
