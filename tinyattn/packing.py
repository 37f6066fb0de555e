"""Packed sequences: a padded batch's token rows side by side, without the padding.

A batch of sequences of lengths 1..16, padded to the longest, is about half padding, and
a position-wise layer (a projection, a norm, a feed-forward block, a residual add, the
output head) does nothing useful on a padding row. Packed, the batch's activations are
one (tokens, d) tensor: row i is the token at flat position rows[i] of the padded
(batch, length) grid, sequence by sequence. Position-wise layers take it as it is;
attention, the one layer that needs to know which tokens share a sequence, takes the
Packing too, and lays its queries, keys and values out as (batch, heads, length, d)
itself (tinyattn.kernels.attention), where padding keys are masked as before.

    packing = Packing.of_lengths([3, 1, 2], 4)    # rows [0, 1, 2, 4, 8, 9] of 3 x 4
    packed = packing.pack(x)                      # (3, 4, d) -> (6, d)
    padded = packing.unpack(packed)               # (6, d) -> (3, 4, d), zeros at padding

PyTorch users know the idea as nn.utils.rnn.pack_padded_sequence, and as the
"variable-length" (cu_seqlens) inputs of fused attention kernels.
"""
from . import backend
from .engine import Tensor
from .ops import PutRows, TakeRows


def padded_size(x, packing):
    """(batch, length) of x in the padded layout: its packing's when x is packed, else its first two axes."""
    return (packing.batch, packing.length) if packing is not None else x.shape[:2]


class Packing:
    """Where the rows of a packed tensor sit in a padded (batch, length) batch.

    rows: a 1-D integer tensor of flat indices into batch * length, increasing, one per
    token (Packing.of_lengths makes them for a batch padded after its tokens)."""

    __slots__ = ("batch", "length", "rows")

    def __init__(self, batch, length, rows):
        if not isinstance(rows, Tensor) or rows.ndim != 1 or not backend.is_integer(rows.dtype):
            raise TypeError(f"a Packing's rows must be a 1-D integer tensor of row indices, got "
                            f"{getattr(rows, 'shape', type(rows).__name__)}")
        if rows.shape[0] > batch * length:
            raise ValueError(f"a Packing of {rows.shape[0]} rows does not fit a batch of {batch} x {length} positions")
        self.batch, self.length, self.rows = batch, length, rows

    @classmethod
    def of_lengths(cls, lengths, length, device=None):
        """The Packing of sequences of these lengths, each padded after its tokens to `length`.
        Made from the lengths on the host, so nothing is read back from a device."""
        if any(not 0 < n <= length for n in lengths):
            raise ValueError(f"sequence lengths must be in 1..{length}, got {list(lengths)}")
        rows = [row * length + position for row, n in enumerate(lengths) for position in range(n)]
        return cls(len(lengths), length, Tensor(rows, dtype=backend.int64, device=device))

    @property
    def tokens(self):
        return self.rows.shape[0]

    @property
    def has_padding(self):
        """False when every position holds a token: packed and padded rows are then the same rows."""
        return self.tokens < self.batch * self.length

    def pack(self, x):
        """x (batch, length, ...) as its token rows, (tokens, ...)."""
        self.check_padded(x, "pack")
        return TakeRows.apply(x.reshape((self.batch * self.length,) + x.shape[2:]), rows=self.rows.data)

    def unpack(self, x):
        """Packed x (tokens, ...) in the padded layout (batch, length, ...), zeros at padding."""
        self.check_packed(x, "unpack")
        padded = PutRows.apply(x, rows=self.rows.data, count=self.batch * self.length)
        return padded.reshape((self.batch, self.length) + x.shape[1:])

    def check_packed(self, x, what):
        if x.ndim < 1 or x.shape[0] != self.tokens:
            raise ValueError(f"{what}: a packed input needs one row per token ({self.tokens}), got shape {x.shape}")

    def check_padded(self, x, what):
        if x.ndim < 2 or x.shape[:2] != (self.batch, self.length):
            raise ValueError(f"{what}: a padded input must be (batch={self.batch}, length={self.length}, ...), got {x.shape}")

    def __repr__(self):
        return f"Packing(batch={self.batch}, length={self.length}, tokens={self.tokens})"
