"""Softmax cross-entropy of logits against integer targets, with label smoothing and ignored targets.

    cross_entropy_rows_composed  per-row losses from log_softmax and indexing (the reference)
    FusedCrossEntropyRows        per-row losses as one Function; its gradient is softmax - target
    cross_entropy                checks the targets, picks one by the kernels switch, reduces
"""
from ..engine import Function
from ..ops import check_ids_in_range, constant
from . import fused_selected, rows
from .softmax import log_softmax


def cross_entropy(logits, targets, ignore_index=None, label_smoothing=0.0, reduction="mean"):
    """Cross-entropy of (..., C) logits against integer targets of shape (...).

    'mean' averages over the targets that are not `ignore_index`. With label smoothing
    eps the target distribution is (1 - eps) on the true class plus eps/C everywhere.
    The per-target losses come from FusedCrossEntropyRows or cross_entropy_rows_composed
    by the kernels switch.
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
    check_ids_in_range(safe_targets, classes, f"cross_entropy targets for {classes} classes")
    keep_weights = keep.astype(logits.dtype)
    if fused_selected():
        losses = FusedCrossEntropyRows.apply(flat_logits, targets=safe_targets, keep=keep_weights, smoothing=label_smoothing)
    else:
        losses = cross_entropy_rows_composed(flat_logits, safe_targets, keep_weights, label_smoothing)
    if reduction == "none":
        return losses.reshape(targets.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    # The count stays on the device: reading it back would synchronise a GPU on every loss.
    return total / constant(logits.xp.maximum(keep.sum(), 1).astype(logits.dtype))


def cross_entropy_rows_composed(flat_logits, targets, keep_weights, label_smoothing):
    log_probs = log_softmax(flat_logits, axis=-1)
    losses = -log_probs[flat_logits.xp.arange(flat_logits.shape[0]), targets]
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * log_probs.mean(axis=-1)
    return losses * constant(keep_weights)


class FusedCrossEntropyRows(Function):
    """Per-row cross-entropy of (N, C) logits with label smoothing, ignored rows zero.

    Reference: cross_entropy_rows_composed, built from log_softmax and indexing.
    """

    def forward(self, logits, targets, keep, smoothing):
        xp = self.xp
        row_ids = xp.arange(logits.shape[0])
        log_probs = rows.log_softmax(xp, logits)
        losses = -(1.0 - smoothing) * log_probs[row_ids, targets]
        if smoothing:
            losses -= smoothing * rows.row_sum(xp, log_probs)[:, 0] * (1.0 / logits.shape[1])
        losses *= keep
        self.log_probs, self.targets, self.keep, self.smoothing, self.row_ids = log_probs, targets, keep, smoothing, row_ids
        return losses

    def backward(self, grad):
        rows.refuse_create_graph("fused cross-entropy")
        xp = self.xp
        # d loss_i / d logits_i = softmax_i - target distribution_i
        grad_logits = xp.exp(self.log_probs)
        grad_logits[self.row_ids, self.targets] -= 1.0 - self.smoothing
        if self.smoothing:
            grad_logits -= self.smoothing / grad_logits.shape[1]
        grad_logits *= (grad.data * self.keep)[:, None]
        return constant(grad_logits)
