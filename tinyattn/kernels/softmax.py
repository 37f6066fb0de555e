"""Softmax and log-softmax as engine Functions: rows.softmax / rows.log_softmax forward, and a
short backward in Tensor ops, so that they differentiate twice. The composed references of
the other kernels build on them."""
from ..engine import Function
from . import rows


class Softmax(Function):
    def forward(self, x, axis):
        self.axis = axis
        moved = self.xp.moveaxis(x, axis, -1)
        weights = rows.softmax(self.xp, moved.copy(), remake_scores=moved.copy)
        return self.xp.moveaxis(weights, -1, axis)

    def backward(self, grad):
        y = self.output
        return y * (grad - (grad * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, axis):
        self.axis = axis
        moved = self.xp.moveaxis(x, axis, -1)
        log_probs = rows.log_softmax(self.xp, moved.reshape(-1, moved.shape[-1]))
        return self.xp.moveaxis(log_probs.reshape(moved.shape), -1, axis)

    def backward(self, grad):
        return grad - self.output.exp() * grad.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)
