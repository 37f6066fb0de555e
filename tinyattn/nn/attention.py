"""Multi-head attention: every output position looks at every input position and weighs them.

Each head projects the input into queries, keys and values of size d_model / n_heads,
runs scaled dot-product attention, and the heads' results are joined and projected back
to d_model. The computation is tinyattn.kernels.attention's: its composed reference
spells out those steps in engine ops; its fused block runs them as one Function.
"""
from .. import backend
from ..creation import default_generator
from ..kernels.attention import AttentionProjections, multi_head_attention
from ..packing import padded_size
from .layers import Linear
from .module import Module
from .positions import ALiBiPositionalBias, RotaryPositionalEncoding, position_array, positions_after

POSITIONAL = {"rope": RotaryPositionalEncoding, "alibi": ALiBiPositionalBias}


class MultiHeadAttention(Module):
    """Self-attention (context=None) or cross-attention over `context`.

    forward returns (output, weights): weights are the per-head attention weights of
    shape (B, n_heads, T, S) when need_weights=True, else None.

    cache: a dict this layer fills with the keys and values it computed. In
    self-attention the new keys and values are appended to it, so decoding one token
    at a time projects only that token; in cross-attention the context's keys and
    values are computed once and reused.

    positional: None, "rope" (queries and keys turned by their positions) or "alibi" (a
    per-head penalty on the distance between the query's and the key's positions). Then
    `positions` are the queries' positions and `context_positions` the context's keys'
    (tinyattn.nn.positions; None: 0, 1, ..., in self-attention after what the cache
    holds), and the cache also keeps its keys' positions.

    packing and context_packing (tinyattn.packing.Packing): x, or the context, is packed,
    one row per token of a padded batch, and so is the output; padding is then never
    projected (tinyattn.kernels.attention).
    """

    def __init__(self, d_model, n_heads, bias=True, dropout=0.0, generator=None, device=None, dtype=backend.float32,
                 positional=None):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
        if positional is not None and positional not in POSITIONAL:
            raise ValueError(f"positions inside attention are {', '.join(POSITIONAL)} or None, got {positional!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.generator = generator or default_generator()
        make = dict(bias=bias, generator=generator, device=device, dtype=dtype)
        self.q_proj = Linear(d_model, d_model, **make)
        self.k_proj = Linear(d_model, d_model, **make)
        self.v_proj = Linear(d_model, d_model, **make)
        self.out_proj = Linear(d_model, d_model, **make)
        self.positional = positional
        self.rotary = RotaryPositionalEncoding(self.head_dim, device=device, dtype=dtype) if positional == "rope" else None
        self.alibi = ALiBiPositionalBias(n_heads, device=device, dtype=dtype) if positional == "alibi" else None

    def forward(self, x, context=None, mask=None, causal=False, need_weights=False, cache=None, positions=None,
                context_positions=None, packing=None, context_packing=None):
        rotary = score_bias = None
        if self.positional is not None:
            length = padded_size(x, packing)[1]
            context_length = None if context is None else padded_size(context, context_packing)[1]
            queries, keys, new_keys = self._positions(x, length, context_length, cache, positions, context_positions)
            if self.rotary is not None:
                rotary = (self.rotary.turns(queries), None if new_keys is None else self.rotary.turns(new_keys))
            else:
                score_bias = self.alibi.bias(queries, keys)
        projections = AttentionProjections.of(self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        return multi_head_attention(x, projections, self.n_heads, context=context, mask=mask, causal=causal,
                                    dropout_p=self.dropout if self.training else 0.0, generator=self.generator,
                                    cache=cache, need_weights=need_weights, rotary=rotary, score_bias=score_bias,
                                    packing=packing, context_packing=context_packing)

    def _positions(self, x, length, context_length, cache, positions, context_positions):
        """Integer arrays (rows, length) of the queries' positions, of every key's, and of the keys this
        call projects (None when a cross-attention cache already holds them); the cache notes its keys'.
        length, context_length: the padded lengths of x and of the context (None for self-attention)."""
        cached = cache.get("positions") if cache is not None else None
        if context_length is None:  # the new keys are the new tokens, after those the cache holds
            queries = positions_after(cache, length, x) if positions is None else position_array(positions, 0, length, x)
            new_keys = queries
            keys = queries if cached is None else x.xp.concatenate([cached, queries], axis=-1)
        else:
            queries = position_array(positions, 0, length, x)
            new_keys = None if cached is not None else position_array(context_positions, 0, context_length, x)
            keys = cached if cached is not None else new_keys
        if cache is not None:
            cache["positions"] = keys
        return queries, keys, new_keys

    def extra_repr(self):
        positional = f", positional={self.positional}" if self.positional else ""
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}{positional}"
