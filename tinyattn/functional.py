"""Stateless building blocks of networks: softmax, normalisation, losses, attention.

Softmax and log-softmax are Functions of their own: a numerically stable forward
(subtract the row maximum) with a short backward written in Tensor ops, so they
still support gradients of gradients. The rest is composed from engine ops and
autodiff derives the gradient.
"""
import math

from . import backend
from .engine import Function, Tensor, is_grad_enabled
from .fused import MASKED_SCORE, FusedAttention, FusedCrossEntropyRows, FusedLayerNorm
from .ops import constant, where


class Softmax(Function):
    def forward(self, x, axis):
        self.axis = axis
        shifted = x - x.max(axis=axis, keepdims=True)  # exp never overflows: the largest term is exp(0)
        e = self.xp.exp(shifted)
        return e / e.sum(axis=axis, keepdims=True)

    def backward(self, grad):
        y = self.output
        return y * (grad - (grad * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, axis):
        self.axis = axis
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - self.xp.log(self.xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(self, grad):
        return grad - self.output.exp() * grad.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def layer_norm(x, weight=None, bias=None, eps=1e-5, fused=True):
    """Normalise the last axis to zero mean and unit variance, then scale and shift.

    fused=True (with weight and bias) runs one Function with a hand-derived backward,
    first-order only; fused=False composes engine ops and can be differentiated twice.
    """
    if fused and weight is not None and bias is not None:
        return FusedLayerNorm.apply(x, weight, bias, eps=eps)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    normalized = centered / (variance + eps).sqrt()
    if weight is not None:
        normalized = normalized * weight
    if bias is not None:
        normalized = normalized + bias
    return normalized


class Linear(Function):
    """x @ weight.T + bias as one Function: a single 2-D GEMM over all rows of x, whatever
    its batch shape. Its backward is written in Tensor ops, so it differentiates twice."""

    def forward(self, x, weight, bias=None):
        out = backend.matmul(x.reshape(-1, x.shape[-1]), weight.T)
        if bias is not None:
            out += bias
        return out.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, grad):
        x, weight = self.inputs[:2]
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = (rows @ weight).reshape(x.shape) if self.needs_input_grad[0] else None
        grad_weight = rows.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None
        if len(self.inputs) == 2:
            return grad_x, grad_weight
        # The column sum as a product with a ones vector: much faster than a reduction in NumPy.
        ones = constant(grad.xp.ones(rows.shape[0], dtype=grad.dtype))
        return grad_x, grad_weight, ones @ rows


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight of shape (out_features, in_features) as in PyTorch."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} has {x.shape[-1]} features, weight {weight.shape} expects {weight.shape[1]}")
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


class Embedding(Function):
    """Rows of a table picked by integer ids. The gradient of the table is one-hot(ids)^T @ grad,
    one GEMM, where scattering with numpy.add.at is several times slower."""

    def forward(self, weight, ids):
        self.ids = ids
        return weight[ids]

    def backward(self, grad):
        weight = self.inputs[0]
        one_hot = self.xp.eye(weight.shape[0], dtype=grad.dtype)[self.ids.reshape(-1)]
        return constant(one_hot).T @ grad.reshape(-1, weight.shape[1])


def embedding(ids, weight):
    """Rows of `weight` picked by integer `ids` (any shape); ids outside the table are an error."""
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    if ids.size:
        low, high = int(ids.data.min()), int(ids.data.max())
        if low < 0 or high >= weight.shape[0]:
            bad = low if low < 0 else high
            raise IndexError(f"token id {bad} is out of range for an embedding table of {weight.shape[0]} rows")
    return Embedding.apply(weight, ids=ids.data)


def dropout_mask(shape, p, generator, like):
    """A keep-mask scaled by 1/(1-p), drawn on the host from `generator` so seeds match across devices."""
    keep = generator.random(shape) >= p
    return constant(backend.to_device(keep.astype(like.dtype) * (1.0 / (1.0 - p)), like.device))


def dropout(x, p, training, generator):
    """Zero each element with probability p during training and scale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return x * dropout_mask(x.shape, p, generator, x)


def cross_entropy(logits, targets, ignore_index=None, label_smoothing=0.0, reduction="mean", fused=True):
    """Cross-entropy of (..., C) logits against integer targets of shape (...).

    'mean' averages over the targets that are not `ignore_index`. With label smoothing
    eps the target distribution is (1 - eps) on the true class plus eps/C everywhere.
    fused=True computes the per-target losses in one Function (first-order gradients
    only); fused=False composes log_softmax and indexing (differentiable twice).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy targets must be integer class ids, got dtype {targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits of shape {logits.shape} need targets of shape {logits.shape[:-1]}, got {targets.shape}")
    classes = logits.shape[-1]
    flat_logits = logits.reshape(-1, classes)
    flat_targets = targets.data.reshape(-1)
    keep = flat_targets != ignore_index if ignore_index is not None else logits.xp.ones(flat_targets.shape, dtype=bool)
    safe_targets = flat_targets * keep  # ignored rows pick class 0, then get weight 0
    if safe_targets.size and (int(safe_targets.min()) < 0 or int(safe_targets.max()) >= classes):
        raise IndexError(f"cross_entropy: target values must lie in [0, {classes}), got {int(safe_targets.min())}..{int(safe_targets.max())}")
    keep_weights = keep.astype(logits.dtype)
    if fused:
        losses = FusedCrossEntropyRows.apply(flat_logits, targets=safe_targets, keep=keep_weights, smoothing=label_smoothing)
    else:
        losses = _cross_entropy_rows_composed(flat_logits, safe_targets, keep_weights, label_smoothing)
    if reduction == "none":
        return losses.reshape(targets.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total * (1.0 / max(int(keep.sum()), 1))


def _cross_entropy_rows_composed(flat_logits, targets, keep_weights, label_smoothing):
    log_probs = log_softmax(flat_logits, axis=-1)
    losses = -log_probs[flat_logits.xp.arange(flat_logits.shape[0]), targets]
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * log_probs.mean(axis=-1)
    return losses * constant(keep_weights)


# --- attention ---------------------------------------------------------------------


def attention_mask(mask, causal, query_length, key_length, like):
    """The boolean may-attend mask combining `mask` and a causal mask, or None for no mask.

    The causal mask is aligned bottom-right: query i sits at position S - T + i, so a
    query block decoded against a longer cache sees every earlier key.
    """
    allowed = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != backend.bool_:
            raise TypeError(f"attention mask must be a boolean tensor (True = may attend), got {getattr(mask, 'dtype', type(mask).__name__)}")
        allowed = mask.data
    if causal:
        xp = like.xp
        offset = key_length - query_length
        lower = xp.arange(key_length)[None, :] <= xp.arange(query_length)[:, None] + offset
        allowed = lower if allowed is None else allowed & lower
    return allowed


def attention_composed(q, k, v, allowed, dropout_p, generator, return_weights):
    """softmax(q k^T / sqrt(d)) v written with engine ops; autodiff derives every gradient."""
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if allowed is not None:
        scores = where(constant(allowed), scores, MASKED_SCORE)
    weights = softmax(scores, axis=-1)
    if allowed is not None:
        # A query whose keys are all masked gets no weight at all, not a uniform average.
        weights = weights * constant(allowed.any(axis=-1, keepdims=True).astype(weights.dtype))
    attended = dropout(weights, dropout_p, True, generator) if dropout_p else weights
    out = attended @ v
    return (out, weights) if return_weights else (out, None)


def scaled_dot_product_attention(q, k, v, mask=None, causal=False, dropout_p=0.0, return_weights=False,
                                 generator=None, fused=True):
    """Attention over (..., T, d) queries and (..., S, d) keys and values.

    mask: boolean, True = may attend, broadcastable to (..., T, S). causal: each query
    sees only keys at or before its own position. A query with every key masked gets
    zeros. Returns the output, or (output, weights) with return_weights=True.
    fused=True runs one Function with a hand-derived backward (faster, first-order
    gradients only); fused=False composes engine ops (slower, differentiable twice).
    Weights requested while gradients are recorded come from the composed path, so a
    loss on the weights gets its gradient.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention needs q (..., T, d), k (..., S, d), v (..., S, dv); got {q.shape}, {k.shape}, {v.shape}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p and generator is None:
        raise ValueError("attention dropout needs a seeded generator (generator=tinyattn.Generator(seed))")
    allowed = attention_mask(mask, causal, q.shape[-2], k.shape[-2], q)
    weights_need_grad = return_weights and is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if not fused or weights_need_grad:  # the fused op's weights are constants; composed ones carry gradient
        out, weights = attention_composed(q, k, v, allowed, dropout_p, generator, return_weights)
        return (out, weights) if return_weights else out
    weights_shape = q.shape[:-1] + (k.shape[-2],)
    keep_scale = dropout_mask(weights_shape, dropout_p, generator, q).data if dropout_p else None
    weights_sink = [] if return_weights else None
    out = FusedAttention.apply(q, k, v, allowed=allowed, keep_scale=keep_scale, weights_sink=weights_sink)
    return (out, constant(weights_sink[0])) if return_weights else out
