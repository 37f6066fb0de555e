"""The position-wise feed-forward block: Linear, activation (ReLU or GELU), dropout, Linear.

    feed_forward_composed  from engine ops (the reference)
    FusedFeedForward       one Function, the activation done in place
    feed_forward           picks one of them by the kernels switch

When x is a LayerNorm's deferred output (kernels.layer_norm), the fused block normalises
x's rows itself and folds the norm's scale and shift into the first projection; its own
output is deferred (kernels.deferred), so a residual added to it is added inside the block.
The block is position-wise: on packed rows (tinyattn.packing) it computes no padding row.
"""
from ..backend import matmul
from ..ops import GELU_CUBIC, GELU_SCALE, constant, linear
from . import fused_selected, rows
from .dropout import dropout_mask
from .deferred import DeferredBlockOutput
from .layer_norm import DeferredLayerNorm
from .sublayer import FusedSublayer

ACTIVATIONS = ("relu", "gelu")


def feed_forward_composed(x, weight1, bias1, weight2, bias2, activation="relu", keep_scale=None):
    hidden = linear(x, weight1, bias1)
    hidden = hidden.relu() if activation == "relu" else hidden.gelu()
    if keep_scale is not None:
        hidden = hidden * constant(keep_scale)
    return linear(hidden, weight2, bias2)


def _gelu_in_place(xp, pre):
    """GELU (tanh form, as ops.GELU) of `pre`, in place; returns its slope at `pre` for backward."""
    inner = pre * pre
    inner *= GELU_CUBIC
    inner += 1.0
    inner *= pre
    inner *= GELU_SCALE
    t = xp.tanh(inner, out=inner)
    slope = 1.0 - t * t
    slope *= pre
    slope *= (1.0 + 3.0 * GELU_CUBIC * pre * pre) * GELU_SCALE
    slope += 1.0 + t
    slope *= 0.5
    t += 1.0
    t *= 0.5
    pre *= t
    return slope


class FusedFeedForward(FusedSublayer):
    """[LayerNorm,] Linear, activation, (dropout,) Linear as one Function (reference:
    feed_forward_composed). With norm_eps, x is the input of a LayerNorm with weight
    norm_weight and bias norm_bias, folded into weight1 and bias1 (rows.fold_norm).
    keep_scale is the dropout keep-mask or None; biases may be None. A residual (shaped like
    the output) is added to the output in place."""

    def forward(self, x, weight1, bias1, weight2, bias2, norm_weight, norm_bias, residual, *, activation, norm_eps,
                keep_scale):
        xp = self.xp
        x2 = x.reshape(-1, x.shape[-1])
        self.has_bias = (bias1 is not None, bias2 is not None)
        rows_in, weight1_used, bias1 = self._input_rows(x2, weight1, bias1, norm_weight, norm_bias, norm_eps)
        hidden = matmul(rows_in, weight1_used.T)
        if bias1 is not None:
            hidden += bias1
        if activation == "relu":
            xp.maximum(hidden, 0, out=hidden)
            # The ReLU's mask, kept as bools: multiplying by it in backward is half the cost of remaking it there.
            self.slope = hidden > 0
        else:
            self.slope = _gelu_in_place(xp, hidden)
        if keep_scale is not None:
            keep_scale = keep_scale.reshape(hidden.shape)
        dropped = hidden * keep_scale if keep_scale is not None else hidden
        out = matmul(dropped, weight2.T)
        if bias2 is not None:
            out += bias2
        out = self._add_residual(out, x, residual)
        self.x_shape, self.weight1_used, self.weight2 = x.shape, weight1_used, weight2
        self.rows_in, self.dropped, self.keep_scale = rows_in, dropped, keep_scale
        return out.reshape(x.shape[:-1] + (weight2.shape[0],))

    def backward(self, grad):
        rows.refuse_create_graph("fused feed-forward")
        xp = self.xp
        g2 = grad.data.reshape(-1, grad.shape[-1])
        grad_weight2, grad_bias2 = matmul(g2.T, self.dropped), rows.column_sum(xp, g2)
        grad_hidden = matmul(g2, self.weight2)
        if self.keep_scale is not None:
            grad_hidden *= self.keep_scale
        grad_hidden *= self.slope  # the activation's derivative (for ReLU: gradient only where its input was positive)
        grad_weight1, grad_bias1 = matmul(grad_hidden.T, self.rows_in), rows.column_sum(xp, grad_hidden)
        grad_x = matmul(grad_hidden, self.weight1_used)
        grad_x, grad_weight1, grad_bias1, grad_norm_weight, grad_norm_bias, grad_residual = self._input_grads(
            grad_x, self.rows_in, grad_weight1, grad_bias1, g2)
        grads = (grad_x.reshape(self.x_shape), grad_weight1, grad_bias1 if self.has_bias[0] else None, grad_weight2,
                 grad_bias2 if self.has_bias[1] else None, grad_norm_weight, grad_norm_bias, grad_residual)
        return tuple(None if g is None else constant(g) for g in grads)


def feed_forward(x, weight1, bias1, weight2, bias2, activation="relu", dropout_p=0.0, generator=None):
    """linear2(dropout(activation(linear1(x)))), weights (out, in) as in PyTorch's Linear, over
    the last axis of x: padded (batch, length, d) or packed (tokens, d) rows alike.
    Runs FusedFeedForward or feed_forward_composed by the kernels switch."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if x.shape[-1] != weight1.shape[1]:
        raise ValueError(f"feed-forward: input of shape {x.shape} has {x.shape[-1]} features, weight1 {weight1.shape} expects {weight1.shape[1]}")
    hidden_shape = x.shape[:-1] + (weight1.shape[0],)
    keep_scale = dropout_mask(hidden_shape, dropout_p, generator, x).data if dropout_p else None
    if not fused_selected():
        return feed_forward_composed(x, weight1, bias1, weight2, bias2, activation, keep_scale)
    norm = x.deferred_norm() if isinstance(x, DeferredLayerNorm) else None
    x, norm_weight, norm_bias, norm_eps = norm if norm is not None else (x, None, None, None)

    def run(residual):
        return FusedFeedForward.apply(x, weight1, bias1, weight2, bias2, norm_weight, norm_bias, residual,
                                      activation=activation, norm_eps=norm_eps, keep_scale=keep_scale)

    parameters = (x, weight1, bias1, weight2, bias2, norm_weight, norm_bias)
    return DeferredBlockOutput(run, x, x.shape[:-1] + (weight2.shape[0],),
                               any(t is not None and t.requires_grad for t in parameters))
