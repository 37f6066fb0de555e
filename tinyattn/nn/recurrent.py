"""Recurrent building blocks: a GRU cell, run over a sequence one way or both, and additive (Bahdanau) attention.

They exist to show what attention fixed. A recurrent encoder reads a sequence one step
at a time into a fixed-size state; without attention the decoder sees only the last
state. Additive attention (Bahdanau, Cho and Bengio 2014) lets the decoder score every
encoder state at every step and read a weighted sum of them instead.
"""
import math

from .. import backend
from ..creation import empty_parameter_data
from ..kernels.recurrent import additive_attention, gru_cell
from ..ops import concatenate, constant, stack, where
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


def run_gru(cell, inputs, mask=None, initial=None, reverse=False):
    """Run `cell` over a list of per-step inputs (B, input); returns every state (B, T, hidden) and the last.

    The inputs come as a list (made per step, e.g. by embedding one column of tokens)
    rather than sliced from one (B, T, input) tensor: the gradient of a slice is a
    full-size array, so T slices would cost T full passes in backward.
    mask (B, T) boolean: where False (padding), the state is carried over unchanged, so
    the last state of each row is its state after its own last real token.
    reverse: read the inputs last to first (the backward direction of a bidirectional
    GRU). The states still come in input order, and the one returned last is the state
    after the first input. Padding sits at a row's end, so it is read first and leaves the
    initial state as it is: each row's backward pass starts at its own last real token.
    """
    first = inputs[0]
    h = initial if initial is not None else constant(first.xp.zeros((first.shape[0], cell.hidden_size), dtype=first.dtype))
    order = range(len(inputs) - 1, -1, -1) if reverse else range(len(inputs))
    states = [None] * len(inputs)
    for t in order:
        new = cell(inputs[t], h)
        h = new if mask is None else where(mask[:, t:t + 1], new, h)
        states[t] = h
    return stack(states, axis=1), h


def run_bidirectional_gru(cell, cell_reverse, inputs, mask=None):
    """A bidirectional GRU over a list of per-step inputs (B, input), as the encoder of
    Bahdanau et al.'s RNNsearch (PyTorch: nn.GRU(bidirectional=True, batch_first=True)).

    `cell` reads first to last, `cell_reverse` last to first (see run_gru). Returns the
    annotations (B, T, 2 hidden), each position's forward state then its backward one, so
    every position has read the whole sequence, and the final states (B, 2 hidden): the
    forward state after each row's last real input, then the backward state after its first.
    """
    forward, last = run_gru(cell, inputs, mask)
    backward, first = run_gru(cell_reverse, inputs, mask, reverse=True)
    return concatenate([forward, backward], axis=-1), concatenate([last, first], axis=-1)


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
