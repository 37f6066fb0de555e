"""Recurrent building blocks: a GRU cell and additive (Bahdanau) attention, from engine ops.

They exist to show what attention fixed. A recurrent encoder reads a sequence one step
at a time into a fixed-size state; without attention the decoder sees only the last
state. Additive attention (Bahdanau, Cho and Bengio 2014) lets the decoder score every
encoder state at every step and read a weighted sum of them instead.
"""
import math

from .. import backend, functional as F
from ..creation import empty_parameter_data
from ..fused import FusedAdditiveAttention, FusedGRUCell
from ..ops import stack, where
from . import init
from .layers import Linear
from .module import Module, Parameter


class GRUCell(Module):
    """One step of a gated recurrent unit, with PyTorch's GRUCell equations and names:

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)        reset gate
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)        update gate
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))     candidate state
        h' = (1 - z) * n + z * h

    weight_ih is (3 * hidden, input) holding [W_ir; W_iz; W_in], weight_hh likewise.
    All weights start uniform in +-1/sqrt(hidden), as in PyTorch. fused=True (default)
    runs the step as one Function with a hand-derived backward (first-order gradients
    only); fused=False composes engine ops, the reference the fused step is tested
    against, and differentiable twice.
    """

    def __init__(self, input_size, hidden_size, generator=None, device=None, dtype=backend.float32, fused=True):
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"GRUCell needs positive sizes, got input_size={input_size}, hidden_size={hidden_size}")
        self.input_size, self.hidden_size, self.fused = input_size, hidden_size, fused
        bound = 1.0 / math.sqrt(hidden_size)

        def parameter(*shape):
            return init.uniform_(Parameter(empty_parameter_data(shape, dtype, device)), -bound, bound, generator)

        self.weight_ih = parameter(3 * hidden_size, input_size)
        self.weight_hh = parameter(3 * hidden_size, hidden_size)
        self.bias_ih = parameter(3 * hidden_size)
        self.bias_hh = parameter(3 * hidden_size)

    def forward(self, x, h):
        """The next hidden state (B, hidden) from input x (B, input) and state h (B, hidden)."""
        if self.fused:
            return FusedGRUCell.apply(x, h, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh)
        gates_x = F.linear(x, self.weight_ih, self.bias_ih)
        gates_h = F.linear(h, self.weight_hh, self.bias_hh)
        size = self.hidden_size
        reset = (gates_x[:, :size] + gates_h[:, :size]).sigmoid()
        update = (gates_x[:, size:2 * size] + gates_h[:, size:2 * size]).sigmoid()
        candidate = (gates_x[:, 2 * size:] + reset * gates_h[:, 2 * size:]).tanh()
        return candidate + update * (h - candidate)  # = (1 - z) * n + z * h, one op shorter

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}"


def run_gru(cell, inputs, mask=None, initial=None):
    """Run `cell` over a list of per-step inputs (B, input); returns every state (B, T, hidden) and the last.

    The inputs come as a list (made per step, e.g. by embedding one column of tokens)
    rather than sliced from one (B, T, input) tensor: the gradient of a slice is a
    full-size array, so T slices would cost T full passes in backward.
    mask (B, T) boolean: where False (padding), the state is carried over unchanged, so
    the last state of each row is its state after its own last real token.
    """
    first = inputs[0]
    h = initial if initial is not None else F.constant(first.xp.zeros((first.shape[0], cell.hidden_size), dtype=first.dtype))
    states = []
    for t, x in enumerate(inputs):
        new = cell(x, h)
        h = new if mask is None else where(mask[:, t:t + 1], new, h)
        states.append(h)
    return stack(states, axis=1), h


class AdditiveAttention(Module):
    """score(q, k_s) = v . tanh(W_q q + W_k k_s); weights = softmax over s; context = sum_s weights_s k_s.

    Keys are projected once per sequence (`project_keys`), queries once per step.
    fused=True (default) runs it as one Function with a hand-derived backward
    (first-order only); fused=False composes engine ops.
    """

    def __init__(self, query_size, key_size, attention_size, generator=None, device=None, dtype=backend.float32, fused=True):
        super().__init__()
        self.fused = fused
        make = dict(generator=generator, device=device, dtype=dtype)
        self.query_proj = Linear(query_size, attention_size, bias=False, **make)
        self.key_proj = Linear(key_size, attention_size, **make)
        bound = 1.0 / math.sqrt(attention_size)
        self.score = init.uniform_(Parameter(empty_parameter_data((attention_size,), dtype, device)), -bound, bound, generator)

    def project_keys(self, keys):
        return self.key_proj(keys)

    def forward(self, query, keys, projected_keys=None, mask=None):
        """query (B, Q), keys (B, S, K), mask (B, S) boolean (True = real key).

        Returns the context (B, K) and the weights (B, S). A row with no real key gets zeros.
        """
        projected_keys = self.project_keys(keys) if projected_keys is None else projected_keys
        if self.fused:
            sink = []
            context = FusedAdditiveAttention.apply(query, keys, projected_keys, self.query_proj.weight, self.score,
                                                   mask=mask.data if mask is not None else None, weights_sink=sink)
            return context, F.constant(sink[0])
        energy = (projected_keys + self.query_proj(query)[:, None, :]).tanh()
        scores = energy @ self.score  # (B, S)
        if mask is not None:
            scores = where(mask, scores, F.MASKED_SCORE)
        weights = F.softmax(scores, axis=-1)
        if mask is not None:
            weights = weights * F.constant(mask.data.any(axis=-1, keepdims=True).astype(weights.dtype))
        context = (weights[:, None, :] @ keys)[:, 0]
        return context, weights
