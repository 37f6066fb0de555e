"""Multi-head attention: every output position looks at every input position and weighs them.

Each head projects the input into queries, keys and values of size d_model / n_heads,
runs scaled dot-product attention, and the heads' results are joined and projected back
to d_model. The computation is tinyattn.kernels.attention's: its composed reference
spells out those steps in engine ops; its fused block runs them as one Function.
"""
from .. import backend
from ..creation import default_generator
from ..kernels.attention import AttentionProjections, multi_head_attention
from .layers import Linear
from .module import Module


class MultiHeadAttention(Module):
    """Self-attention (context=None) or cross-attention over `context`.

    forward returns (output, weights): weights are the per-head attention weights of
    shape (B, n_heads, T, S) when need_weights=True, else None.

    cache: a dict this layer fills with the keys and values it computed. In
    self-attention the new keys and values are appended to it, so decoding one token
    at a time projects only that token; in cross-attention the context's keys and
    values are computed once and reused.
    """

    def __init__(self, d_model, n_heads, bias=True, dropout=0.0, generator=None, device=None, dtype=backend.float32):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.generator = generator or default_generator()
        make = dict(bias=bias, generator=generator, device=device, dtype=dtype)
        self.q_proj = Linear(d_model, d_model, **make)
        self.k_proj = Linear(d_model, d_model, **make)
        self.v_proj = Linear(d_model, d_model, **make)
        self.out_proj = Linear(d_model, d_model, **make)

    def forward(self, x, context=None, mask=None, causal=False, need_weights=False, cache=None):
        projections = AttentionProjections.of(self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        return multi_head_attention(x, projections, self.n_heads, context=context, mask=mask, causal=causal,
                                    dropout_p=self.dropout if self.training else 0.0, generator=self.generator,
                                    cache=cache, need_weights=need_weights)

    def extra_repr(self):
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"
