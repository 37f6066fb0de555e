"""Kernels: each building block twice, a composed reference and a fused Function, and the one switch between them.

Every module here holds, side by side:
- the composed reference, written with engine ops, which autodiff differentiates (the
  code a student reads; differentiable twice);
- a fused Function with a hand-derived backward on raw arrays (fast; first-order
  gradients only: under create_graph it raises and says to switch to composed);
- the function the layers call, which picks one of the two by the switch below.

    attention.py      scaled dot-product attention, and the whole multi-head block
    layer_norm.py     layer normalisation
    feed_forward.py   Linear, activation, dropout, Linear
    cross_entropy.py  softmax cross-entropy with label smoothing and ignored targets
    recurrent.py      a GRU step, and additive (Bahdanau) attention
    rows.py           the array pieces they share: softmax, the masked-row rule, row sums,
                      row normalisation

The switch: `with tinyattn.kernels.use("composed"): ...` runs everything inside on the
composed references (`train.py --kernels composed`); "fused" is the default. It is read
in one place, `fused_selected()`, by each kernel's picking function, never by a layer.
It is a context variable: it holds for the current thread and carries into the shards
of a training step (tinyattn.parallel runs them in a copy of the caller's context).

The one request a fused kernel cannot take: a key/value cache (step-by-step decoding)
while gradients are recorded. The multi-head block then runs the composed reference and
says so once (a warning naming the kernel). Decoding runs under no_grad and stays fused.
"""
import contextlib
import contextvars
import warnings

DEFAULT = "fused"
CHOICES = ("fused", "composed")

_selected = contextvars.ContextVar("tinyattn_kernels", default=DEFAULT)
_warned = set()


def selected():
    """'fused' or 'composed': what the kernels run now."""
    return _selected.get()


def fused_selected():
    """The one place the switch is read: whether a kernel should run its fused Function."""
    return _selected.get() == "fused"


@contextlib.contextmanager
def use(kind):
    """Run the block with every kernel on its `kind` path: 'fused' or 'composed'."""
    if kind not in CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(CHOICES)}, got {kind!r}")
    token = _selected.set(kind)
    try:
        yield
    finally:
        _selected.reset(token)


def composed_instead(kernel, reason):
    """Say once per kernel and reason that a fused request runs the composed reference."""
    if (kernel, reason) not in _warned:
        _warned.add((kernel, reason))
        warnings.warn(f"{kernel}: {reason}, so it runs the composed reference (see tinyattn.kernels)", stacklevel=3)
