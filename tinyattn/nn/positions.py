"""Positional encodings: how a transformer learns where each token sits.

Attention on its own sees a set: permute the tokens and each output permutes with them.
Positions come in at one of two places.

Added to the token embeddings, once, before the first layer (absolute positions):
    SinusoidalPositionalEncoding  fixed sin/cos waves of geometric wavelengths (Vaswani et al. 2017)
    LearnedPositionalEncoding     one trained vector per position (GPT-2)
Inside every attention, from the query's and the key's positions (relative positions):
    RotaryPositionalEncoding      queries and keys turned by angles proportional to their
                                  positions, so q.k depends on content and on i - j (RoPE, Su et al. 2021)
    ALiBiPositionalBias           minus a per-head slope times |i - j| added to the scores
                                  (ALiBi, Press et al. 2022)

Positions are a tensor or array of integers, (T,) or (rows, T) with rows 1 or the batch's, or
None for 0, 1, 2, ... (from `offset`, or after what a cache holds). randomized_positions
draws them as Ruoss et al. (2023) do: a sorted random subset of a longer range.
"""
import math

from .. import backend
from ..creation import empty_parameter_data
from ..engine import Tensor
from ..kernels.rows import reads_are_free
from . import init
from .module import Module, Parameter


def position_array(positions, offset, length, like):
    """The positions of `length` tokens as an integer array (rows, length) on like's device:
    `positions` as given, or offset, offset + 1, ... as one row."""
    if positions is None:
        return like.xp.arange(offset, offset + length)[None, :]
    array = positions.data if isinstance(positions, Tensor) else positions
    array = array[None, :] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[-1] != length:
        raise ValueError(f"positions of shape {tuple(array.shape)} do not fit {length} tokens: expected (rows, {length})")
    return array


def positions_after(cache, length, like):
    """(1, length) positions of tokens that follow those a self-attention cache holds (0, 1, ... without one)."""
    past = cache["k"].shape[2] if cache is not None and "k" in cache else 0
    return like.xp.arange(past, past + length)[None, :]


def _table_rows(offset, length, positions, max_len, like):
    """What to index a table of max_len positions with: a slice for offset..offset+length-1, else the
    positions' array. Past the table is an error; positions on a GPU are checked where they are made,
    as reading them here would wait for the device (ops.check_ids_in_range)."""
    if positions is None:
        if offset + length > max_len:
            raise ValueError(f"positions {offset}..{offset + length - 1} exceed the positional encoding's max_len {max_len}")
        return slice(offset, offset + length)
    rows = position_array(positions, offset, length, like)
    if rows.size and reads_are_free(rows) and int(rows.max()) >= max_len:
        raise ValueError(f"position {int(rows.max())} exceeds the positional encoding's max_len {max_len}")
    return rows


class SinusoidalPositionalEncoding(Module):
    """Adds sin/cos waves of geometric wavelengths (Vaswani et al. 2017); nothing to learn."""

    def __init__(self, d_model, max_len=512, device=None, dtype=backend.float32):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        # Dimension pair (2i, 2i+1) turns at frequency 10000^(-2i/d): wavelengths from 2*pi to 10000*2*pi.
        frequencies = [10000.0 ** (-(i - i % 2) / d_model) for i in range(d_model)]
        table = [[math.sin(pos * f) if i % 2 == 0 else math.cos(pos * f) for i, f in enumerate(frequencies)]
                 for pos in range(max_len)]
        self.table = Tensor(table, dtype=dtype, device=device)  # a buffer: moves with .to(), not trained

    def forward(self, x, offset=0, positions=None):
        """x (B, T, d_model) plus the waves of positions offset..offset+T-1, or of `positions`."""
        return x + self.table[_table_rows(offset, x.shape[-2], positions, self.max_len, x)]


class LearnedPositionalEncoding(Module):
    """One trained vector per position, as in GPT-2."""

    def __init__(self, max_len, d_model, generator=None, device=None, dtype=backend.float32):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.weight = init.normal_(Parameter(empty_parameter_data((max_len, d_model), dtype, device)), 0.0, 0.02, generator)

    def forward(self, x, offset=0, positions=None):
        """x (B, T, d_model) plus the rows of positions offset..offset+T-1, or of `positions`."""
        return x + self.weight[_table_rows(offset, x.shape[-2], positions, self.max_len, x)]


class RotaryPositionalEncoding(Module):
    """RoPE: the angles by which each attention head turns its queries and keys.

    Feature pair (i, i + head_dim/2) of a query or key at position p turns by p * base^(-2i/head_dim).
    Turning both changes q.k into a function of the content and of the difference of the two
    positions alone, so a head that learned "the key 3 places back" finds it at any position.
    The turning itself is tinyattn.kernels.attention.rotate, on both kernel paths.
    """

    def __init__(self, head_dim, base=10000.0, device=None, dtype=backend.float32):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions turn pairs of features: the head size must be even, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self.inverse_frequencies = Tensor([base ** (-2 * i / head_dim) for i in range(head_dim // 2)],
                                          dtype=dtype, device=device)  # a buffer

    def turns(self, positions):
        """(cos, sin) of the angles of integer positions (rows, T), each (rows, 1, T, head_dim): one
        row per position, the same for every head, a pair's two features sharing an angle."""
        frequencies = self.inverse_frequencies.data
        xp = backend.array_module(frequencies)
        angles = positions[:, None, :, None].astype(frequencies.dtype) * frequencies
        angles = xp.concatenate([angles, angles], axis=-1)
        return xp.cos(angles), xp.sin(angles)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, base={self.base:g}"


def alibi_slopes(n_heads):
    """ALiBi's slope of each head: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^-8 for n
    a power of two; otherwise those of the power of two below n, then every other slope of the
    next power of two (Press et al. 2022)."""
    if n_heads & (n_heads - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)]
    below = 2 ** int(math.log2(n_heads))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][:n_heads - below]


class ALiBiPositionalBias(Module):
    """ALiBi: head h adds -slope_h * |i - j| to the score of query position i for key position j.

    Nothing is added to the embeddings and nothing is learned: each head prefers nearby
    keys, some strongly (slope 1/2 with 4 heads), some hardly (1/256). The bias depends on
    the distance alone, so it means the same at positions never trained on. Under a causal
    mask only j <= i remain, which is ALiBi as published; without one (an encoder, or
    cross-attention) the bias is symmetric.
    """

    def __init__(self, n_heads, device=None, dtype=backend.float32):
        super().__init__()
        self.n_heads = n_heads
        self.slopes = Tensor(alibi_slopes(n_heads), dtype=dtype, device=device)  # a buffer

    def bias(self, query_positions, key_positions):
        """The (rows, n_heads, T, S) bias for integer positions of queries (rows, T) and keys (rows, S)."""
        slopes = self.slopes.data
        xp = backend.array_module(slopes)
        distance = xp.abs(query_positions[:, None, :, None] - key_positions[:, None, None, :])
        return (-distance).astype(slopes.dtype) * slopes[:, None, None]

    def extra_repr(self):
        return f"n_heads={self.n_heads}"


def randomized_positions(lengths, max_positions, generator, width=None, device=None):
    """Ruoss et al. (2023): for each row, `lengths[row]` positions drawn from 0..max_positions-1
    without repeats and sorted, instead of 0..length-1; as an int64 tensor (rows, width), a row
    shorter than `width` (default: the longest) repeating its last position. Trained on such
    positions, a model meets every position of the longer range, and only the order of
    positions carries over from one sequence to the next, not their distances."""
    width = max(lengths) if width is None else width
    if max(lengths) > max_positions:
        raise ValueError(f"cannot draw {max(lengths)} positions without repeats from {max_positions}")
    rows = []
    for length in lengths:
        drawn = sorted(generator.choice(max_positions, size=length, replace=False).tolist())
        rows.append(drawn + drawn[-1:] * (width - length))
    return Tensor(rows, dtype=backend.int64, device=device)
