"""Multi-head attention: every output position looks at every input position and weighs them.

Each head projects the input into queries, keys and values of size d_model / n_heads,
runs scaled dot-product attention (tinyattn.functional), and the heads' results are
joined and projected back to d_model.
"""
from .. import backend, functional as F
from ..creation import default_generator
from ..engine import is_grad_enabled
from ..fused import FusedMultiHeadAttention
from ..ops import concatenate
from .layers import Linear
from .module import Module


class MultiHeadAttention(Module):
    """Self-attention (context=None) or cross-attention over `context`.

    forward returns (output, weights): weights are the per-head attention weights of
    shape (B, n_heads, T, S) when need_weights=True, else None.

    fused=True runs the whole block, projections included, as one Function with a
    hand-derived backward (first-order gradients only); fused=False composes the Linear
    layers and attention from engine ops, for study and gradients of gradients. Decoding
    with a cache always takes the composed path, with fused attention inside.

    cache: a dict this layer fills with the keys and values it computed. In
    self-attention the new keys and values are appended to it, so decoding one token
    at a time projects only that token; in cross-attention the context's keys and
    values are computed once and reused.
    """

    def __init__(self, d_model, n_heads, bias=True, dropout=0.0, generator=None, fused=True, device=None, dtype=backend.float32):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout, self.fused = dropout, fused
        self.generator = generator or default_generator()
        make = dict(bias=bias, generator=generator, device=device, dtype=dtype)
        self.q_proj = Linear(d_model, d_model, **make)
        self.k_proj = Linear(d_model, d_model, **make)
        self.v_proj = Linear(d_model, d_model, **make)
        self.out_proj = Linear(d_model, d_model, **make)

    def _split_heads(self, x):
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.n_heads, self.head_dim).swapaxes(1, 2)

    def _keys_and_values(self, x, context, cache):
        if cache is not None and context is not None and "k" in cache:
            return cache["k"], cache["v"]
        source = x if context is None else context
        k, v = self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source))
        if cache is not None:
            if context is None and "k" in cache:
                k, v = concatenate([cache["k"], k], axis=2), concatenate([cache["v"], v], axis=2)
            cache["k"], cache["v"] = k, v
        return k, v

    def forward(self, x, context=None, mask=None, causal=False, need_weights=False, cache=None, residual=None, norm=None):
        """residual: a tensor shaped like x to add to the output (a transformer's skip connection).
        norm: a LayerNorm to apply to x first (pre-LN). The fused block adds a residual that
        is x in place and folds the norm's scale and shift into its projections."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention expects input of shape (batch, length, {self.d_model}), got {x.shape}")
        if context is not None and (context.ndim != 3 or context.shape[-1] != self.d_model or context.shape[0] != x.shape[0]):
            raise ValueError(f"context must be (batch={x.shape[0]}, length, {self.d_model}), got {context.shape}")
        dropout_p = self.dropout if self.training else 0.0
        weights_need_grad = need_weights and is_grad_enabled()
        if self.fused and cache is None and self.q_proj.bias is not None and not weights_need_grad:
            return self._fused_block(x, context, mask, causal, dropout_p, need_weights, residual, norm)
        x_in = x if norm is None else norm(x)
        q = self._split_heads(self.q_proj(x_in))
        k, v = self._keys_and_values(x_in, context, cache)
        result = F.scaled_dot_product_attention(
            q, k, v, mask=mask, causal=causal, dropout_p=dropout_p,
            return_weights=need_weights, generator=self.generator, fused=self.fused)
        out, weights = result if need_weights else (result, None)
        batch, length = x.shape[:2]
        out = self.out_proj(out.swapaxes(1, 2).reshape(batch, length, self.d_model))
        return (out if residual is None else residual + out), weights

    def _fused_block(self, x, context, mask, causal, dropout_p, need_weights, residual, norm):
        source_length = x.shape[1] if context is None else context.shape[1]
        allowed = F.attention_mask(mask, causal, x.shape[1], source_length, x)
        weights_shape = (x.shape[0], self.n_heads, x.shape[1], source_length)
        keep_scale = F.dropout_mask(weights_shape, dropout_p, self.generator, x).data if dropout_p else None
        weights_sink = [] if need_weights else None
        params = [p for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj) for p in (linear.weight, linear.bias)]
        fold = norm is not None and norm.fused
        x_in = x if norm is None or fold else norm(x)
        add_input = residual is not None and residual is x_in
        inputs = [x_in] + ([] if context is None else [context]) + params + ([norm.weight, norm.bias] if fold else [])
        out = FusedMultiHeadAttention.apply(*inputs, heads=self.n_heads, cross=context is not None,
                                            norm_eps=norm.eps if fold else None, add_input=add_input, allowed=allowed,
                                            keep_scale=keep_scale, weights_sink=weights_sink)
        if residual is not None and not add_input:
            out = residual + out
        return out, (F.constant(weights_sink[0]) if need_weights else None)

    def extra_repr(self):
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}, fused={self.fused}"
