"""Attention, softmax(q k^T / sqrt(d) + mask) v: the core on its own, and the whole multi-head block.

    attention_composed            the core from engine ops (the reference)
    FusedAttention                the core as one Function; outputs (output, weights)
    scaled_dot_product_attention  picks one of them by the kernels switch

    multi_head_attention_composed the block from engine ops: projections, heads, core, output projection
    FusedMultiHeadAttention       the block as one Function; outputs (output, weights)
    multi_head_attention          picks one of them by the kernels switch

    rotate                        RoPE's turn of queries and keys, one definition for both paths

Both paths take the same boolean may-attend mask and the same dropout keep-mask, so they
compute the same function. Masked scores are MASKED_SCORE, and a query whose keys are all
masked gets no weight at all (rows.rows_with_a_key), on both paths. The multi-head block
also takes positions in two forms (tinyattn.nn.positions makes them): rotations of the
queries and keys (RoPE) and a bias added to the scores (ALiBi).
"""
import collections
import functools
import math

from .. import backend
from ..backend import matmul
from ..engine import Function, Tensor, is_grad_enabled
from ..ops import concatenate, constant, linear, where
from ..packing import padded_size
from . import composed_instead, fused_selected, rows
from .dropout import dropout_mask
from .deferred import DeferredBlockOutput
from .layer_norm import DeferredLayerNorm
from .softmax import softmax
from .sublayer import FusedSublayer, put_rows, take_rows


def attention_mask(mask, causal, query_length, key_length, like, weights_shape=None):
    """The boolean may-attend mask (an array) combining `mask` and a causal mask, or None for no mask.

    The causal mask is aligned bottom-right: query i sits at position S - T + i, so a
    query block decoded against a longer cache sees every earlier key. weights_shape: the
    attention weights' shape (..., T, S), which `mask` must broadcast to (checked on the
    shapes alone, nothing read from the device).
    """
    allowed = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != backend.bool_:
            raise TypeError(f"attention mask must be a boolean tensor (True = may attend), got {getattr(mask, 'dtype', type(mask).__name__)}")
        if weights_shape is not None and not _broadcasts_to(mask.shape, weights_shape):
            raise ValueError(f"attention mask of shape {mask.shape} must broadcast to the attention weights' shape "
                             f"(..., queries, keys) = {weights_shape}")
        allowed = mask.data
    if causal:
        xp = like.xp
        offset = key_length - query_length
        lower = xp.arange(key_length)[None, :] <= xp.arange(query_length)[:, None] + offset
        allowed = lower if allowed is None else allowed & lower
    return allowed


def _broadcasts_to(shape, target):
    return len(shape) <= len(target) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(target)))


# --- the core ----------------------------------------------------------------------------------

def attention_composed(q, k, v, allowed=None, keep_scale=None, score_bias=None):
    """softmax(q k^T / sqrt(d) + score_bias) v written with engine ops; autodiff derives every
    gradient. Returns (output, weights); keep_scale is a dropout keep-mask (an array) for the
    weights, score_bias an array added to the scaled scores (ALiBi's distances)."""
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if score_bias is not None:
        scores = scores + constant(score_bias)
    if allowed is not None:
        scores = where(constant(allowed), scores, rows.MASKED_SCORE)
    weights = softmax(scores, axis=-1)
    if allowed is not None:
        weights = weights * constant(rows.rows_with_a_key(allowed, weights.dtype))
    attended = weights if keep_scale is None else weights * constant(keep_scale)
    return attended @ v, weights


def additive_mask(xp, allowed, dtype, score_bias=None):
    """0 where attention is allowed, MASKED_SCORE where not, plus score_bias (an array, or None);
    None for neither."""
    mask_bias = None if allowed is None else xp.where(allowed, 0.0, rows.MASKED_SCORE).astype(dtype)
    if score_bias is None:
        return mask_bias
    return score_bias if mask_bias is None else mask_bias + score_bias


def _scores(q_scaled, k_t, mask_bias):
    scores = matmul(q_scaled, k_t)
    if mask_bias is not None:
        scores += mask_bias
    return scores


def attention_forward(xp, q_scaled, k_t, v, allowed, mask_bias, keep_scale, out=None):
    """softmax(q_scaled k^T + mask_bias) v for q_scaled (..., T, d) already multiplied by
    1/sqrt(d) (callers fold that into work they do anyway), k_t (..., d, S), v (..., S, dv).
    q_scaled and v may be strided views, and the output goes into `out` when given.
    Returns (output, weights, attended), attended being the weights after dropout."""
    weights = rows.softmax(xp, _scores(q_scaled, k_t, mask_bias), lambda: _scores(q_scaled, k_t, mask_bias), allowed)
    attended = weights * keep_scale if keep_scale is not None else weights
    return matmul(attended, v, out=out), weights, attended


def attention_backward(xp, grad_out, grad_weights, q_scaled, k, v, weights, attended, keep_scale,
                       grads_into=(None, None, None)):
    """Gradients (q_scaled, k, v) of attention_forward's output and weights (grad_weights may be
    None), for k as (..., S, d), written into the arrays (or strided views) of grads_into where given."""
    grad_q_into, grad_k_into, grad_v_into = grads_into
    grad_v = matmul(attended.swapaxes(-1, -2), grad_out, out=grad_v_into)
    # NumPy's batched matmul is slow when its right operand is a transposed view: copy it first.
    grad_scores = matmul(grad_out, xp.ascontiguousarray(v.swapaxes(-1, -2)))  # first the gradient of the (dropped-out) weights
    if keep_scale is not None:
        grad_scores *= keep_scale
    if grad_weights is not None:
        grad_scores += grad_weights
    # softmax backward: dS = P * (dP - rowsum(dP * P)); masked entries have P = 0.
    grad_scores -= rows.row_sum(xp, grad_scores * weights)
    grad_scores *= weights
    grad_q_scaled = matmul(grad_scores, k, out=grad_q_into)
    grad_k = matmul(grad_scores.swapaxes(-1, -2), q_scaled, out=grad_k_into)
    return grad_q_scaled, grad_k, grad_v


def _zeros_for_missing(xp, grad, shape, dtype):
    """The output gradient as an array; zeros for an output no gradient reached (only the
    weights were used), so one backward rule covers every case."""
    return xp.zeros(shape, dtype=dtype) if grad is None else grad.data


class FusedAttention(Function):
    """softmax(q k^T / sqrt(d) + mask) v as one Function, outputs (output, weights);
    reference: attention_composed."""

    def forward(self, q, k, v, *, allowed, keep_scale):
        mask_bias = additive_mask(self.xp, allowed, q.dtype)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        q_scaled = q * self.scale
        # A contiguous K^T makes the batched GEMMs twice as fast, but copying it costs as much
        # as the scores of one query: a decoding step (one new query against the cache) skips it.
        k_t = k.swapaxes(-1, -2) if q.shape[-2] == 1 else self.xp.ascontiguousarray(k.swapaxes(-1, -2))
        out, self.weights, self.attended = attention_forward(self.xp, q_scaled, k_t, v, allowed, mask_bias, keep_scale)
        self.q_scaled, self.k, self.v, self.keep_scale = q_scaled, k, v, keep_scale
        return out, self.weights

    def backward(self, grad_out, grad_weights):
        rows.refuse_create_graph("fused attention")
        grad_out = _zeros_for_missing(self.xp, grad_out, self.weights.shape[:-1] + self.v.shape[-1:], self.v.dtype)
        grad_q_scaled, grad_k, grad_v = attention_backward(
            self.xp, grad_out, None if grad_weights is None else grad_weights.data, self.q_scaled, self.k, self.v,
            self.weights, self.attended, self.keep_scale)
        grad_q_scaled *= self.scale
        return constant(grad_q_scaled), constant(grad_k), constant(grad_v)


def scaled_dot_product_attention(q, k, v, mask=None, causal=False, dropout_p=0.0, return_weights=False, generator=None):
    """Attention over (..., T, d) queries and (..., S, d) keys and values.

    mask: boolean, True = may attend, broadcastable to (..., T, S). causal: each query
    sees only keys at or before its own position. A query with every key masked gets
    zeros. Returns the output, or (output, weights) with return_weights=True; the weights
    carry gradient on both paths. Runs FusedAttention or attention_composed by the kernels switch.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention needs q (..., T, d), k (..., S, d), v (..., S, dv); got {q.shape}, {k.shape}, {v.shape}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p and generator is None:
        raise ValueError("attention dropout needs a seeded generator (generator=tinyattn.Generator(seed))")
    weights_shape = q.shape[:-1] + (k.shape[-2],)
    allowed = attention_mask(mask, causal, q.shape[-2], k.shape[-2], q, weights_shape)
    keep_scale = dropout_mask(weights_shape, dropout_p, generator, q).data if dropout_p else None
    if fused_selected():
        out, weights = FusedAttention.apply(q, k, v, allowed=allowed, keep_scale=keep_scale)
    else:
        out, weights = attention_composed(q, k, v, allowed, keep_scale)
    return (out, weights) if return_weights else out


# --- rotary positions (RoPE) -----------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def half_turn(xp, size, dtype):
    """The (size, size) matrix R with [x1, x2] @ R = [-x2, x1] for x split into halves: a quarter
    turn of every feature pair (i, i + size/2). Made once and shared; never write to it."""
    half = size // 2
    turn = xp.zeros((size, size), dtype=dtype)
    pairs = xp.arange(half)
    turn[pairs + half, pairs] = -1.0
    turn[pairs, pairs + half] = 1.0
    return turn


def rotate(x, cos, sin):
    """x (..., d) with each feature pair (i, i + d/2) turned by its angle: x cos + (x R) sin, R the
    half_turn, cos and sin (..., d) the angles' cosines and sines (equal in both halves).

    Written in the operators that arrays and Tensors share, so the composed reference (on
    Tensors) and the fused block (on arrays) run this one definition. Turning back is
    rotate(y, cos, -sin): a fused backward turns the gradients so."""
    xp = x.xp if isinstance(x, Tensor) else backend.array_module(x)
    return x * cos + (x @ half_turn(xp, x.shape[-1], x.dtype)) * sin


# --- the multi-head block -------------------------------------------------------------------------

class AttentionProjections(collections.namedtuple(
        "AttentionProjections", "q_weight q_bias k_weight k_bias v_weight v_bias out_weight out_bias")):
    """The weights of a multi-head block by name: (d_model, d_model) matrices as in PyTorch's
    Linear, and biases (None where a projection has none)."""

    @classmethod
    def of(cls, q, k, v, out):
        """From four layers with .weight and .bias (nn.Linear)."""
        return cls(q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, out.weight, out.bias)


def _split_heads(x, heads):
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).swapaxes(1, 2)


def multi_head_attention_composed(x, projections, heads, context=None, allowed=None, keep_scale=None, cache=None,
                                  rotary=None, score_bias=None):
    """The block from engine ops: project, split into heads, attend, merge the heads, project.
    Returns (output (B, T, d), weights (B, heads, T, S)).

    cache: a dict filled with the keys and values (B, heads, S, d). In self-attention the
    new keys and values are appended to it, so decoding one token at a time projects only
    that token; in cross-attention the context's are computed once and reused.
    rotary: ((cos, sin) of the queries, (cos, sin) of the keys this call projects), by which
    they are turned (rotate) before the scores; a cache keeps the keys turned. score_bias:
    an array broadcastable to the weights, added to the scaled scores.
    """
    p = projections
    q = _split_heads(linear(x, p.q_weight, p.q_bias), heads)
    if rotary is not None:
        q = rotate(q, *rotary[0])
    if cache is not None and context is not None and "k" in cache:
        k, v = cache["k"], cache["v"]
    else:
        source = x if context is None else context
        k = _split_heads(linear(source, p.k_weight, p.k_bias), heads)
        v = _split_heads(linear(source, p.v_weight, p.v_bias), heads)
        if rotary is not None:
            k = rotate(k, *rotary[1])
        if cache is not None:
            if context is None and "k" in cache:
                k, v = concatenate([cache["k"], k], axis=2), concatenate([cache["v"], v], axis=2)
            cache["k"], cache["v"] = k, v
    out, weights = attention_composed(q, k, v, allowed, keep_scale, score_bias)
    batch, length, width = x.shape
    return linear(out.swapaxes(1, 2).reshape(batch, length, width), p.out_weight, p.out_bias), weights


def _heads_view(a2, batch, length, heads):
    """(B*L, heads*d) rows, or a column slice of wider rows, seen as (B, heads, L, d) without
    a copy. Each head's (L, d) matrix has unit column stride, so BLAS reads it, and writes
    it through matmul's out=, in place: the heads are never split or merged by copying."""
    return a2.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)


def _scattered_rows(packing):
    """The row indices a packed input's rows go to in the padded layout (kernels.sublayer.put_rows),
    or None where there is nothing to scatter: a padded input, or a batch without padding."""
    return packing.rows.data if packing is not None and packing.has_padding else None


def _stacked_biases(xp, biases, size, dtype):
    """Projections' biases side by side in one vector, an absent bias as zeros."""
    return xp.concatenate([xp.zeros(size, dtype=dtype) if bias is None else bias for bias in biases])


class FusedMultiHeadAttention(FusedSublayer):
    """A whole multi-head attention block, projections included, as one Function; outputs
    (output, weights). Reference: multi_head_attention_composed.

    Self-attention (context None) projects q, k and v in one GEMM with the stacked weights;
    cross-attention projects k and v of the context in one GEMM. 1/sqrt(d) is folded into
    the q rows of the projection. With norm_eps, x is the input of a LayerNorm with weight
    norm_weight and bias norm_bias whose output this block attends from: x's rows are
    normalised here and the norm's scale and shift folded into the projection of x
    (rows.fold_norm), so the norm's output is never written. Heads are strided views of the
    projection's columns, and the products that make the output and the q, k, v gradients
    write straight into the stacked layouts the next GEMMs read. A residual (shaped like x)
    is added to the output in place. A cache (see multi_head_attention_composed) is for
    decoding, under no_grad. rotary turns the queries and the new keys (rotate) after the
    projection, and backward turns their gradients back; score_bias joins the mask's bias.
    packing and context_packing: the tinyattn.packing.Packing of a packed x and context (one
    row per token), or None for padded (batch, length, d) ones. Packed, only the token rows
    are normalised and projected; they are put into the padded layout the heads need, where
    the queries, keys and values of padding rows are zeros, which attention masks as keys
    or whose outputs no token row reads, and the output's token rows are taken back.
    """

    def forward(self, x, context, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                norm_weight, norm_bias, residual, *, heads, norm_eps, allowed, keep_scale, cache, rotary, score_bias,
                packing=None, context_packing=None):
        xp = self.xp
        self.cross = context is not None
        d_model = x.shape[-1]
        batch, length = padded_size(x, packing)
        self.token_rows, self.row_count = _scattered_rows(packing), batch * length
        x2 = x.reshape(-1, d_model)
        # The rows the x-side projection reads, and that projection's weights (stacked q, k, v
        # for self-attention, q alone for cross-attention), with a leading norm folded in.
        x_side = (q_weight,) if self.cross else (q_weight, k_weight, v_weight)
        w_x = x_side[0] if self.cross else xp.concatenate(x_side)
        b_x = _stacked_biases(xp, (q_bias,) if self.cross else (q_bias, k_bias, v_bias), d_model, x.dtype)
        rows_in, w_x_used, b_x = self._input_rows(x2, w_x, b_x, norm_weight, norm_bias, norm_eps)
        # 1/sqrt(d) goes into the q rows of the small weight matrix, not over the big q.
        self.row_scale = xp.ones(w_x_used.shape[0], dtype=x.dtype)
        self.row_scale[:d_model] = 1.0 / math.sqrt(d_model // heads)
        self.w_x_used = w_x_used * self.row_scale[:, None]
        projected = matmul(rows_in, self.w_x_used.T)
        projected += b_x * self.row_scale
        projected = put_rows(xp, projected, self.token_rows, self.row_count)
        q_scaled = _heads_view(projected[:, :d_model], batch, length, heads)
        if rotary is not None:
            q_scaled = rotate(q_scaled, *rotary[0])
        c2 = rows_in
        if self.cross and cache is not None and "k" in cache:
            k, v = cache["k"].data, cache["v"].data
        else:
            if self.cross:
                context_length = padded_size(context, context_packing)[1]
                self.context_rows = _scattered_rows(context_packing)
                self.context_shape, self.context_count = context.shape, batch * context_length
                c2 = context.reshape(-1, d_model)
                self.w_kv = xp.concatenate([k_weight, v_weight])
                kv2 = matmul(c2, self.w_kv.T)
                kv2 += _stacked_biases(xp, (k_bias, v_bias), d_model, x.dtype)
                kv2 = put_rows(xp, kv2, self.context_rows, self.context_count)
            else:
                kv2 = projected[:, d_model:]
            source_length = kv2.shape[0] // batch
            k = _heads_view(kv2[:, :d_model], batch, source_length, heads)
            v = _heads_view(kv2[:, d_model:], batch, source_length, heads)
            if rotary is not None:
                k = rotate(k, *rotary[1])
            if cache is not None:
                if not self.cross and "k" in cache:
                    k, v = xp.concatenate([cache["k"].data, k], axis=2), xp.concatenate([cache["v"].data, v], axis=2)
                cache["k"], cache["v"] = constant(k), constant(v)
        # The scores' right operand is copied contiguous: a doubly transposed view makes the batched GEMM slow.
        k_t = xp.ascontiguousarray(k.swapaxes(-1, -2))
        mask_bias = additive_mask(xp, allowed, x.dtype, score_bias)
        merged = xp.empty((batch * length, d_model), dtype=x.dtype)
        _, weights, attended = attention_forward(xp, q_scaled, k_t, v, allowed, mask_bias, keep_scale,
                                                 out=_heads_view(merged, batch, length, heads))
        merged = take_rows(merged, self.token_rows)
        y = matmul(merged, out_weight.T)
        if out_bias is not None:
            y += out_bias
        y = self._add_residual(y, x, residual)
        self.saved = (rows_in, c2, q_scaled, k, v, weights, attended, merged, keep_scale, out_weight)
        self.rotary, self.x_shape = rotary, x.shape
        self.has_bias = tuple(b is not None for b in (q_bias, k_bias, v_bias, out_bias))
        return y.reshape(x.shape), weights

    def backward(self, grad_out, grad_weights):
        rows.refuse_create_graph("fused multi-head attention")
        xp = self.xp
        rows_in, c2, q_scaled, k, v, weights, attended, merged, keep_scale, out_weight = self.saved
        batch, heads, length, _ = q_scaled.shape
        source_length, d_model = k.shape[2], merged.shape[1]
        g2 = _zeros_for_missing(xp, grad_out, merged.shape, merged.dtype).reshape(merged.shape)
        grad_out_weight, grad_out_bias = matmul(g2.T, merged), rows.column_sum(xp, g2)
        grad_heads_out = _heads_view(put_rows(xp, matmul(g2, out_weight), self.token_rows, self.row_count),
                                     batch, length, heads)
        # Gradients of q, k and v land side by side, as the stacked projection produced them.
        grad_projected = xp.empty((self.row_count, d_model if self.cross else 3 * d_model), dtype=rows_in.dtype)
        grad_kv = (xp.empty((batch * source_length, 2 * d_model), dtype=rows_in.dtype) if self.cross
                   else grad_projected[:, d_model:])
        grads_into = (_heads_view(grad_projected[:, :d_model], batch, length, heads),
                      _heads_view(grad_kv[:, :d_model], batch, source_length, heads),
                      _heads_view(grad_kv[:, d_model:], batch, source_length, heads))
        grad_weights = None if grad_weights is None else grad_weights.data
        if self.rotary is None:
            attention_backward(xp, grad_heads_out, grad_weights, q_scaled, k, v, weights, attended, keep_scale, grads_into)
        else:  # the gradients of the turned queries and keys, turned back into the projection's layout
            grad_q, grad_k, _ = attention_backward(xp, grad_heads_out, grad_weights, q_scaled, k, v, weights, attended,
                                                   keep_scale, (None, None, grads_into[2]))
            (q_cos, q_sin), (k_cos, k_sin) = self.rotary
            grads_into[0][...] = rotate(grad_q, q_cos, -q_sin)
            grads_into[1][...] = rotate(grad_k, k_cos, -k_sin)
        grad_projected = take_rows(grad_projected, self.token_rows)
        grad_rows = matmul(grad_projected, self.w_x_used)
        grad_w_x, grad_b_x = matmul(grad_projected.T, rows_in), rows.column_sum(xp, grad_projected)
        grad_w_x *= self.row_scale[:, None]  # back from the scaled q rows to the weights as given
        grad_b_x *= self.row_scale
        grad_rows, grad_w_x, grad_b_x, grad_norm_weight, grad_norm_bias, grad_residual = self._input_grads(
            grad_rows, rows_in, grad_w_x, grad_b_x, g2)
        grad_context = None
        if self.cross:
            grad_kv = take_rows(grad_kv, self.context_rows)
            grad_context = matmul(grad_kv, self.w_kv).reshape(self.context_shape)
            grad_w_in = xp.concatenate([grad_w_x, matmul(grad_kv.T, c2)])
            grad_b_in = xp.concatenate([grad_b_x, rows.column_sum(xp, grad_kv)])
        else:
            grad_w_in, grad_b_in = grad_w_x, grad_b_x
        parts = [slice(part * d_model, (part + 1) * d_model) for part in range(3)]
        grad_biases = [grad_b_in[part] if has else None for part, has in zip(parts, self.has_bias)]
        grads = (grad_rows.reshape(self.x_shape), grad_context,
                 grad_w_in[parts[0]], grad_biases[0], grad_w_in[parts[1]], grad_biases[1], grad_w_in[parts[2]], grad_biases[2],
                 grad_out_weight, grad_out_bias if self.has_bias[3] else None, grad_norm_weight, grad_norm_bias, grad_residual)
        return tuple(None if g is None else constant(g) for g in grads)


def _records_gradients(*tensors):
    return is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_input(x, packing, d_model, what):
    """A padded (batch, length, d_model) input, or a packed (tokens, d_model) one for its packing."""
    if packing is None:
        if x.ndim != 3 or x.shape[-1] != d_model:
            raise ValueError(f"multi-head attention expects {what} of shape (batch, length, {d_model}), got {x.shape}")
    elif x.ndim != 2 or x.shape != (packing.tokens, d_model):
        raise ValueError(f"multi-head attention expects a packed {what} of shape (tokens={packing.tokens}, {d_model}) "
                         f"for {packing}, got {x.shape}")


def multi_head_attention(x, projections, heads, context=None, mask=None, causal=False, dropout_p=0.0, generator=None,
                         cache=None, need_weights=False, rotary=None, score_bias=None, packing=None, context_packing=None):
    """Multi-head attention of x (B, T, d) over context (B, S, d), or over itself when context
    is None. Returns (output (B, T, d), weights (B, heads, T, S) or None); the weights carry gradient.
    rotary and score_bias bring positions in (see multi_head_attention_composed).

    Runs FusedMultiHeadAttention or multi_head_attention_composed by the kernels switch. A
    cache while gradients are recorded takes the composed reference (said once). When x is
    a LayerNorm's deferred output (kernels.layer_norm), the fused block folds that norm;
    without a cache or weights asked for, its output is deferred (kernels.deferred), so a
    residual added to it is added inside the block.

    packing and context_packing (tinyattn.packing.Packing): x, or the context, is packed,
    (tokens, d), one row per token of a padded (B, T) batch; the output is then packed
    like x. The fused block projects the token rows alone; the composed reference unpacks
    x and the context into the padded layout, attends, and packs its output.
    """
    d_model = projections.q_weight.shape[0]
    _check_input(x, packing, d_model, "input")
    batch, length = padded_size(x, packing)
    source_length = length
    if context is not None:
        _check_input(context, context_packing, d_model, "context")
        context_batch, source_length = padded_size(context, context_packing)
        if context_batch != batch:
            raise ValueError(f"context must hold the input's batch of {batch}, got {context.shape}"
                             + (f" packed from {context_packing}" if context_packing is not None else ""))
    if cache is not None and (packing is not None or context_packing is not None):
        raise ValueError("a key/value cache decodes padded (batch, length, d) inputs, not packed ones")
    if cache is not None and context is None and "k" in cache:
        source_length += cache["k"].shape[2]
    elif cache is not None and "k" in cache:
        source_length = cache["k"].shape[2]
    weights_shape = (batch, heads, length, source_length)
    allowed = attention_mask(mask, causal, length, source_length, x, weights_shape)
    if score_bias is not None and not _broadcasts_to(score_bias.shape, weights_shape):
        raise ValueError(f"a score bias of shape {score_bias.shape} must broadcast to the attention weights' shape "
                         f"(batch, heads, queries, keys) = {weights_shape}")
    keep_scale = dropout_mask(weights_shape, dropout_p, generator, x).data if dropout_p else None
    fused = fused_selected()
    records = fused and _records_gradients(x, context, *projections)
    if records and cache is not None:
        composed_instead("multi-head attention", "a key/value cache while gradients are recorded")
        fused = False
    if not fused:
        padded_x = x if packing is None else packing.unpack(x)
        padded_context = context if context_packing is None else context_packing.unpack(context)
        out, weights = multi_head_attention_composed(padded_x, projections, heads, padded_context, allowed, keep_scale,
                                                     cache, rotary, score_bias)
        return (out if packing is None else packing.pack(out)), (weights if need_weights else None)
    norm = x.deferred_norm() if isinstance(x, DeferredLayerNorm) else None
    if norm is not None:
        x, norm_weight, norm_bias, norm_eps = norm
        records = records or _records_gradients(x, norm_weight, norm_bias)  # the norm folded in is recorded too
    else:
        norm_weight = norm_bias = norm_eps = None

    def run(residual):
        return FusedMultiHeadAttention.apply(x, context, *projections, norm_weight, norm_bias, residual, heads=heads,
                                             norm_eps=norm_eps, allowed=allowed, keep_scale=keep_scale, cache=cache,
                                             rotary=rotary, score_bias=score_bias, packing=packing,
                                             context_packing=context_packing)

    if cache is not None or need_weights:  # a cache is filled, and weights are read, at once
        return run(None)
    deferred = DeferredBlockOutput(lambda residual: run(residual)[0], x, x.shape, records)
    return deferred, None
