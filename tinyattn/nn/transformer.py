"""Transformer blocks: the feed-forward block, pre-LN encoder and decoder layers and their stacks.

Pre-LayerNorm (normalise, then attend or feed forward, then add the residual) trains
stably without careful warm-up, which is why GPT-2 and most small models use it.
Every stack returns (output, weights); weights is None unless need_weights=True.

positional: None, or "rope" or "alibi" for positions inside every attention
(tinyattn.nn.positions); the stacks then take the tokens' `positions` (None: 0, 1, ...).

packing (and memory_packing for the decoder's memory): a tinyattn.packing.Packing when
x (the memory) is packed, one row per token of a padded batch (models' forward_batch
packs them). Every block but attention is position-wise and takes the packed rows as
they are, so no layer computes a padding row; attention lays them out by sequence itself.
"""
from .. import backend
from ..kernels.feed_forward import ACTIVATIONS, feed_forward
from ..creation import default_generator
from ..packing import padded_size
from .attention import MultiHeadAttention
from .layers import Dropout, LayerNorm, Linear
from .module import Module, ModuleList
from .positions import positions_after


class FeedForward(Module):
    """Position-wise two-layer network: Linear, activation, dropout, Linear
    (tinyattn.kernels.feed_forward: the composed reference, or one fused Function)."""

    def __init__(self, d_model, d_ff, dropout=0.0, activation="relu", generator=None, device=None, dtype=backend.float32):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.linear1 = Linear(d_model, d_ff, generator=generator, device=device, dtype=dtype)
        self.dropout = Dropout(dropout, generator)
        self.linear2 = Linear(d_ff, d_model, generator=generator, device=device, dtype=dtype)

    def forward(self, x):
        dropout_p = self.dropout.p if self.dropout.training else 0.0
        return feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                            self.activation, dropout_p, self.dropout.generator)

    def extra_repr(self):
        return f"activation={self.activation}"


class EncoderLayer(Module):
    """Pre-LN: x = x + self_attn(norm1(x)), then x = x + feed_forward(norm2(x))."""

    def __init__(self, d_model, n_heads, d_ff, dropout=0.0, activation="relu", generator=None, device=None,
                 dtype=backend.float32, positional=None):
        super().__init__()
        generator = generator or default_generator()
        make = dict(generator=generator, device=device, dtype=dtype)
        self.norm1 = LayerNorm(d_model, device=device, dtype=dtype)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, positional=positional, **make)
        self.norm2 = LayerNorm(d_model, device=device, dtype=dtype)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation, **make)
        self.dropout = Dropout(dropout, generator)

    def forward(self, x, mask=None, need_weights=False, causal=False, cache=None, positions=None, packing=None):
        """causal=True makes it a decoder-only (GPT) block; cache: a dict for step-by-step decoding."""
        attended, weights = self.self_attn(self.norm1(x), mask=mask, causal=causal, need_weights=need_weights, cache=cache,
                                           positions=positions, packing=packing)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.feed_forward(self.norm2(x)))
        return x, weights


class DecoderLayer(EncoderLayer):
    """Pre-LN, with cross-attention to `memory` between self-attention and the feed-forward block:
    x = x + self_attn(norm1(x)), x = x + cross_attn(cross_norm(x), memory), x = x + feed_forward(norm2(x)).
    Cross-attention is where each output position looks back at every input position.
    """

    def __init__(self, d_model, n_heads, d_ff, dropout=0.0, activation="relu", generator=None, device=None,
                 dtype=backend.float32, positional=None):
        super().__init__(d_model, n_heads, d_ff, dropout, activation, generator, device, dtype, positional)
        self.cross_norm = LayerNorm(d_model, device=device, dtype=dtype)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, generator=self.self_attn.generator,
                                             device=device, dtype=dtype, positional=positional)

    def forward(self, x, memory, self_mask=None, memory_mask=None, need_weights=False, cache=None, positions=None,
                memory_positions=None, packing=None, memory_packing=None):
        """cache: {'self': {}, 'cross': {}} to decode one step at a time (see MultiHeadAttention).

        With positions inside attention, cross-attention compares the target's positions with
        the source's (`memory_positions`, None: 0, 1, ...), both counted from the start of
        their own sequence, as the embeddings' encodings count them: target position i and
        source position i share one place."""
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        if positions is None and self.self_attn.positional is not None:  # the cross-attention's queries too sit after the cache
            positions = positions_after(self_cache, padded_size(x, packing)[1], x)
        attended, self_weights = self.self_attn(self.norm1(x), mask=self_mask, causal=True, need_weights=need_weights,
                                                cache=self_cache, positions=positions, packing=packing)
        x = x + self.dropout(attended)
        attended, cross_weights = self.cross_attn(self.cross_norm(x), context=memory, mask=memory_mask,
                                                  need_weights=need_weights, cache=cross_cache, positions=positions,
                                                  context_positions=memory_positions, packing=packing,
                                                  context_packing=memory_packing)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.feed_forward(self.norm2(x)))
        return x, ({"self": self_weights, "cross": cross_weights} if need_weights else None)


class _Stack(Module):
    def __init__(self, layer_class, num_layers, d_model, n_heads, d_ff, dropout=0.0, activation="relu",
                 generator=None, device=None, dtype=backend.float32, positional=None):
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        generator = generator or default_generator()
        self.layers = ModuleList(layer_class(d_model, n_heads, d_ff, dropout, activation, generator, device, dtype,
                                             positional) for _ in range(num_layers))
        self.norm = LayerNorm(d_model, device=device, dtype=dtype)


class Encoder(_Stack):
    """EncoderLayers and a final LayerNorm (needed with pre-LN: the residual stream is never normalised).

    With causal=True it is the decoder-only stack of GPT: each position sees only itself
    and earlier positions.
    """

    def __init__(self, num_layers, d_model, n_heads, d_ff, **options):
        super().__init__(EncoderLayer, num_layers, d_model, n_heads, d_ff, **options)

    def new_cache(self):
        """An empty key/value cache, one dict per layer, for step-by-step causal decoding."""
        return [{} for _ in self.layers]

    def forward(self, x, mask=None, need_weights=False, causal=False, cache=None, positions=None, packing=None):
        all_weights = []
        for index, layer in enumerate(self.layers):
            x, weights = layer(x, mask=mask, need_weights=need_weights, causal=causal,
                               cache=cache[index] if cache is not None else None, positions=positions,
                               packing=packing)
            all_weights.append(weights)
        return self.norm(x), (all_weights if need_weights else None)


class Decoder(_Stack):
    """DecoderLayers and a final LayerNorm."""

    def __init__(self, num_layers, d_model, n_heads, d_ff, **options):
        super().__init__(DecoderLayer, num_layers, d_model, n_heads, d_ff, **options)

    def new_cache(self):
        """An empty key/value cache, one entry per layer, for step-by-step decoding."""
        return [{"self": {}, "cross": {}} for _ in self.layers]

    def forward(self, x, memory, self_mask=None, memory_mask=None, need_weights=False, cache=None, positions=None,
                memory_positions=None, packing=None, memory_packing=None):
        all_weights = []
        for index, layer in enumerate(self.layers):
            x, weights = layer(x, memory, self_mask=self_mask, memory_mask=memory_mask, need_weights=need_weights,
                               cache=cache[index] if cache is not None else None, positions=positions,
                               memory_positions=memory_positions, packing=packing, memory_packing=memory_packing)
            all_weights.append(weights)
        return self.norm(x), (all_weights if need_weights else None)
