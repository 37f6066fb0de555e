"""Recurrent building blocks: a GRU cell and additive (Bahdanau) attention, from engine ops.

They exist to show what attention fixed. A recurrent encoder reads a sequence one step
at a time into a fixed-size state; without attention the decoder sees only the last
state. Additive attention (Bahdanau, Cho and Bengio 2014) lets the decoder score every
encoder state at every step and read a weighted sum of them instead.
"""
import math

from .. import backend
from ..creation import empty_parameter_data
from ..kernels.recurrent import additive_attention, gru_cell
from ..ops import constant, stack, where
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
    All weights start uniform in +-1/sqrt(hidden), as in PyTorch. The step is
    tinyattn.kernels.recurrent.gru_cell (composed reference, or one fused Function).
    """

    def __init__(self, input_size, hidden_size, generator=None, device=None, dtype=backend.float32):
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"GRUCell needs positive sizes, got input_size={input_size}, hidden_size={hidden_size}")
        self.input_size, self.hidden_size = input_size, hidden_size
        bound = 1.0 / math.sqrt(hidden_size)

        def parameter(*shape):
            return init.uniform_(Parameter(empty_parameter_data(shape, dtype, device)), -bound, bound, generator)

        self.weight_ih = parameter(3 * hidden_size, input_size)
        self.weight_hh = parameter(3 * hidden_size, hidden_size)
        self.bias_ih = parameter(3 * hidden_size)
        self.bias_hh = parameter(3 * hidden_size)

    def forward(self, x, h):
        """The next hidden state (B, hidden) from input x (B, input) and state h (B, hidden)."""
        return gru_cell(x, h, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh)

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
    h = initial if initial is not None else constant(first.xp.zeros((first.shape[0], cell.hidden_size), dtype=first.dtype))
    states = []
    for t, x in enumerate(inputs):
        new = cell(x, h)
        h = new if mask is None else where(mask[:, t:t + 1], new, h)
        states.append(h)
    return stack(states, axis=1), h


class AdditiveAttention(Module):
    """score(q, k_s) = v . tanh(W_q q + W_k k_s); weights = softmax over s; context = sum_s weights_s k_s.

    Keys are projected once per sequence (`project_keys`), queries once per step. The
    rest is tinyattn.kernels.recurrent.additive_attention (composed reference, or one fused Function).
    """

    def __init__(self, query_size, key_size, attention_size, generator=None, device=None, dtype=backend.float32):
        super().__init__()
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
        return additive_attention(query, keys, projected_keys, self.query_proj.weight, self.score, mask)
