"""Deferred results: a kernel's output computed when something first reads it.

They let a layer read as its formula, x + attn(norm(x)), while the fused kernels still
fuse across it. A LayerNorm's deferred output (layer_norm.DeferredLayerNorm) is read by
the next fused block as "normalise these rows", folded into its projection; a fused
block's deferred output (DeferredBlockOutput) absorbs a residual added to it, which the
kernel then adds in place. Anything else that reads one (`.data`: an op, .numpy(),
printing) computes it as it would have been computed at once, in the grad mode of the
moment it was made, so a deferred result is always the same value and the same graph.
"""
import math

from ..engine import Tensor, is_grad_enabled, set_grad_enabled


class Deferred(Tensor):
    """A Tensor whose array and graph node come from `_make()` on first read. Its shape, dtype,
    device and array module are those of `like`, known at once."""

    __slots__ = ("_like", "_shape", "_recorded", "_computed")

    def __init__(self, like, shape, requires_grad):
        self._like, self._shape, self._computed = like, shape, None
        self._recorded = is_grad_enabled()
        self.grad, self._output_index, self._retains_grad = None, 0, False
        self.requires_grad = self._recorded and requires_grad

    def _make(self):
        raise NotImplementedError

    def _in_its_grad_mode(self, make, *args):
        if self._recorded == is_grad_enabled():
            return make(*args)
        with set_grad_enabled(self._recorded):
            return make(*args)

    def _compute(self):
        if self._computed is None:
            self._computed = self._in_its_grad_mode(self._make)
        return self._computed

    def __setitem__(self, index, value):
        """Changes the computed result, which this tensor reads; the change's count goes with it,
        so the ops that read this tensor before still find the values they used (Tensor.__setitem__)."""
        computed = self._compute()
        computed[index] = value
        self._changed_at, self.requires_grad = computed._changed_at, computed.requires_grad

    @property
    def pending(self):
        """True until something has read the result."""
        return self._computed is None

    data = property(lambda self: self._compute().data)
    _ctx = property(lambda self: self._compute()._ctx)
    shape = property(lambda self: self._shape)
    ndim = property(lambda self: len(self._shape))
    size = property(lambda self: math.prod(self._shape))
    dtype = property(lambda self: self._like.dtype)
    device = property(lambda self: self._like.device)
    xp = property(lambda self: self._like.xp)


class DeferredBlockOutput(Deferred):
    """A fused block's output. `x + output` (the residual connection) runs the block with x
    added inside it, in place, and gives that sum; read any other way it is the block's
    output alone. `run(residual)` applies the block's Function (residual may be None)."""

    __slots__ = ("_run",)

    def __init__(self, run, like, shape, requires_grad):
        super().__init__(like, shape, requires_grad)
        self._run = run

    def _make(self):
        return self._run(None)

    def __radd__(self, other):
        if self.pending and _fits(other, self):
            return self._in_its_grad_mode(self._run, other)
        return super().__radd__(other)

    def __add__(self, other):  # addition commutes exactly in floating point: the residual may come second too
        if self.pending and _fits(other, self):
            return self._in_its_grad_mode(self._run, other)
        return super().__add__(other)


def _fits(residual, output):
    """A residual the block can add itself: a computed tensor of the output's shape and dtype (one on
    another device is refused by the block's Function, with the error an add would give)."""
    return (isinstance(residual, Tensor) and not (isinstance(residual, Deferred) and residual.pending)
            and residual.shape == output.shape and residual.dtype == output.dtype)
