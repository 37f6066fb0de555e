"""Fused Functions: a whole block as one Function with a hand-derived backward, for speed.

Each fused Function computes on raw arrays in both directions, reusing buffers in place
where it can, and replaces dozens of small graph nodes with one. Each has a composed
twin built from engine ops (in tinyattn.functional) that autodiff differentiates, and a
test that the two agree. Because their backward works on arrays, fused Functions give
first-order gradients only: under create_graph they raise and name the twin to use.

Two NumPy facts shape the kernels (measured in ../shared/PERF-NOTES.md and
benchmarks/): a reduction over a short last axis is several times slower than the same
sum as a matrix-vector product, and `(B, T, K) @ (K, N)` is much faster as one 2-D GEMM
over B*T rows than as B small GEMMs.
"""
import functools
import math

from .backend import matmul
from .engine import Function, is_grad_enabled
from .ops import constant

MASKED_SCORE = -1e9  # exp(MASKED_SCORE - max) is exactly 0 in float32 and float64
UNDERFLOW_GUARD = 1e-30  # a softmax row sum below this means its terms underflowed
EXP_SAFE = 60.0  # exp(60) * a few hundred terms stays far below float32's largest value


def refuse_create_graph(name, twin):
    if is_grad_enabled():
        raise RuntimeError(f"{name} supports first-order gradients only; for gradients of gradients use {twin}")


@functools.lru_cache(maxsize=256)
def filled_vector(xp, length, value, dtype):
    """A vector of `length` copies of `value`, made once and shared: the GEMVs below take
    one every call, and making it each time costs more than the product. Never write to it."""
    return xp.full(length, value, dtype=dtype)


def row_sum(xp, a):
    """Sum over the last axis, keepdims, as a matrix-vector product."""
    n = a.shape[-1]
    return matmul(a.reshape(-1, n), filled_vector(xp, n, 1.0, a.dtype)).reshape(a.shape[:-1] + (1,))


def column_sum(xp, a2):
    """Sum of the rows of a 2-D array, as a vector-matrix product."""
    return matmul(filled_vector(xp, a2.shape[0], 1.0, a2.dtype), a2)


def row_max(xp, a2):
    """Maximum of each row of a 2-D array with few columns: one elementwise pass per column
    beats NumPy's reduction, which loops per row."""
    top = a2[:, 0].copy()
    for column in range(1, a2.shape[1]):
        xp.maximum(top, a2[:, column], out=top)
    return top[:, None]


# --- layer norm pieces, also folded into the blocks that follow a norm -------------------------

def normalize_rows(xp, rows, eps):
    """Each row of a 2-D array minus its mean, over its standard deviation; returns
    (normalized, 1/std as an (N, 1) column). Row statistics are GEMVs (see row_sum)."""
    dim = rows.shape[-1]
    ones_over_dim = filled_vector(xp, dim, 1.0 / dim, rows.dtype)
    centered = rows - matmul(rows, ones_over_dim)[:, None]
    variance = matmul(centered * centered, ones_over_dim)
    inverse_std = (1.0 / xp.sqrt(variance + eps))[:, None]
    centered *= inverse_std
    return centered, inverse_std


def normalize_rows_backward(xp, grad, normalized, inverse_std, weight=None, grad_times_normalized=None):
    """The gradient of the rows, given the gradient of `normalized * weight` (weight None:
    of `normalized`, and then `grad` is overwritten). `grad_times_normalized` (g * n, if
    the caller has it) is overwritten too.

    dx = rstd * (g*w - mean(g*w) - n * mean(g*w*n)); both means are GEMVs with w / d.
    """
    dim = normalized.shape[-1]
    means_with = filled_vector(xp, dim, 1.0 / dim, grad.dtype) if weight is None else weight * (1.0 / dim)
    if grad_times_normalized is None:
        grad_times_normalized = grad * normalized
    mean_gw = matmul(grad, means_with)[:, None]
    mean_gwn = matmul(grad_times_normalized, means_with)[:, None]
    grad_rows = grad if weight is None else grad * weight
    grad_rows -= mean_gw
    xp.multiply(normalized, mean_gwn, out=grad_times_normalized)
    grad_rows -= grad_times_normalized
    grad_rows *= inverse_std
    return grad_rows


def fold_norm(weight, bias, norm_weight, norm_bias):
    """A projection (W, b) applied to norm_weight * n + norm_bias is the projection
    (W * norm_weight, b + W norm_bias) applied to n: the norm's scale and shift move into
    the small weight matrix, and the big activations skip two passes."""
    return weight * norm_weight, bias + matmul(weight, norm_bias)


def unfold_norm_grads(weight, norm_weight, norm_bias, grad_folded_weight, grad_folded_bias):
    """Gradients of (W, b, norm_weight, norm_bias) from those of fold_norm's (W', b');
    W reaches both W' = W * norm_weight and b' = b + W norm_bias."""
    grad_weight = grad_folded_weight * norm_weight
    grad_weight += grad_folded_bias[:, None] * norm_bias
    return (grad_weight, grad_folded_bias, (grad_folded_weight * weight).sum(axis=0), matmul(grad_folded_bias, weight))


# --- attention kernels shared by FusedAttention and FusedMultiHeadAttention ------------------

def additive_mask(xp, allowed, dtype):
    """0 where attention is allowed, MASKED_SCORE where not; None for no mask."""
    return None if allowed is None else xp.where(allowed, 0.0, MASKED_SCORE).astype(dtype)


def _scores(q_scaled, k_t, mask_bias):
    scores = matmul(q_scaled, k_t)
    if mask_bias is not None:
        scores += mask_bias
    return scores


def attention_forward(xp, q_scaled, k_t, v, mask_bias, keep_scale, out=None):
    """softmax(q_scaled k^T + mask_bias) v for q_scaled (..., T, d) already multiplied by
    1/sqrt(d) (callers fold that into work they do anyway), k_t (..., d, S), v (..., S, dv).
    q_scaled and v may be strided views, and the output goes into `out` when given.

    Returns (output, weights, attended), attended being the weights after dropout.
    The softmax subtracts the single largest score, not each row's, because a full
    reduction is far cheaper than one per short row. A row whose terms underflow
    against it (a row far below the rest, or a fully masked one) shows as a tiny row
    sum; that is rare, and then every row is recomputed with its own maximum.
    """
    scores = _scores(q_scaled, k_t, mask_bias)
    top = float(scores.max())
    if top > EXP_SAFE:  # below it exp cannot overflow, and the pass is saved
        scores -= top
    weights = xp.exp(scores, out=scores)
    sums = row_sum(xp, weights)
    if bool((sums < UNDERFLOW_GUARD).any()):
        weights = _attention_weights_per_row(xp, q_scaled, k_t, mask_bias)
    else:
        weights /= sums
    attended = weights * keep_scale if keep_scale is not None else weights
    return matmul(attended, v, out=out), weights, attended


def _attention_weights_per_row(xp, q_scaled, k_t, mask_bias):
    scores = _scores(q_scaled, k_t, mask_bias)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores, out=scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    if mask_bias is not None:
        # A query whose keys are all masked gets no weight at all, not a uniform average.
        weights *= (mask_bias == 0).any(axis=-1, keepdims=True)
    return weights


def attention_backward(xp, grad_out, q_scaled, k, v, weights, attended, keep_scale, grads_into=(None, None, None)):
    """Gradients (q_scaled, k, v) of attention_forward's output, for k as (..., S, d), written
    into the arrays (or strided views) of grads_into where given."""
    grad_q_into, grad_k_into, grad_v_into = grads_into
    grad_v = matmul(attended.swapaxes(-1, -2), grad_out, out=grad_v_into)
    # NumPy's batched matmul is slow when its right operand is a transposed view: copy it first.
    grad_scores = matmul(grad_out, xp.ascontiguousarray(v.swapaxes(-1, -2)))  # first the gradient of the (dropped-out) weights
    if keep_scale is not None:
        grad_scores *= keep_scale
    # softmax backward: dS = P * (dP - rowsum(dP * P)); masked entries have P = 0.
    grad_scores -= row_sum(xp, grad_scores * weights)
    grad_scores *= weights
    grad_q_scaled = matmul(grad_scores, k, out=grad_q_into)
    grad_k = matmul(grad_scores.swapaxes(-1, -2), q_scaled, out=grad_k_into)
    return grad_q_scaled, grad_k, grad_v


def _inverse_sqrt_dim(q):
    return 1.0 / math.sqrt(q.shape[-1])


class FusedAttention(Function):
    """softmax(q k^T / sqrt(d) + mask) v as one Function (twin: functional.attention_composed)."""

    def forward(self, q, k, v, allowed, keep_scale, weights_sink):
        mask_bias = additive_mask(self.xp, allowed, q.dtype)
        self.scale = _inverse_sqrt_dim(q)
        q_scaled = q * self.scale
        # A contiguous K^T makes the batched GEMMs twice as fast, but copying it costs as much
        # as the scores of one query: a decoding step (one new query against the cache) skips it.
        k_t = k.swapaxes(-1, -2) if q.shape[-2] == 1 else self.xp.ascontiguousarray(k.swapaxes(-1, -2))
        out, self.weights, self.attended = attention_forward(self.xp, q_scaled, k_t, v, mask_bias, keep_scale)
        self.q_scaled, self.keep_scale = q_scaled, keep_scale
        if weights_sink is not None:  # a Function has one output; the weights leave through this list
            weights_sink.append(self.weights)
        return out

    def backward(self, grad):
        refuse_create_graph("fused attention", "scaled_dot_product_attention(..., fused=False)")
        k, v = self.inputs[1].data, self.inputs[2].data
        grad_q_scaled, grad_k, grad_v = attention_backward(self.xp, grad.data, self.q_scaled, k, v, self.weights,
                                                           self.attended, self.keep_scale)
        grad_q_scaled *= self.scale
        return constant(grad_q_scaled), constant(grad_k), constant(grad_v)


def _heads_view(a2, batch, length, heads):
    """(B*L, heads*d) rows, or a column slice of wider rows, seen as (B, heads, L, d) without
    a copy. Each head's (L, d) matrix has unit column stride, so BLAS reads it, and writes
    it through matmul's out=, in place: the heads are never split or merged by copying."""
    return a2.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)


class FusedMultiHeadAttention(Function):
    """A whole multi-head attention block, projections included, as one Function.

    Inputs: x, then context for cross-attention, then Wq, bq, Wk, bk, Wv, bv, Wo, bo,
    then the weight and bias of the LayerNorm applied to x first when norm_eps is given
    (folded into the projections of x: see fold_norm). add_input adds x to the output
    (the residual connection). Self-attention projects q, k and v in one GEMM with the
    stacked weights; cross-attention projects k and v of the context in one GEMM.
    1/sqrt(d) is folded into the q rows of the projection. Heads are strided views of the
    projection's columns, and the products that make the output and the q, k, v
    gradients write straight into the stacked layouts the next GEMMs read.
    Twin: MultiHeadAttention(fused=False), which composes Linear layers and engine ops.
    """

    def forward(self, *arrays, heads, cross, norm_eps, add_input, allowed, keep_scale, weights_sink):
        xp = self.xp
        self.cross, self.norm, self.add_input = cross, norm_eps is not None, add_input
        x, context = arrays[0], (arrays[1] if cross else arrays[0])
        first_weight = 2 if cross else 1
        wq, bq, wk, bk, wv, bv, wo, bo = arrays[first_weight:first_weight + 8]
        batch, length, d_model = x.shape
        source_length = context.shape[1]
        x2 = x.reshape(-1, d_model)
        # The rows the x-side projection reads, and that projection's weights (stacked q, k, v
        # for self-attention, q alone for cross-attention), with a leading norm folded in.
        self.w_x = wq if cross else xp.concatenate([wq, wk, wv])
        b_x = bq if cross else xp.concatenate([bq, bk, bv])
        if self.norm:
            rows, self.inverse_std = normalize_rows(xp, x2, norm_eps)
            w_x_used, b_x = fold_norm(self.w_x, b_x, *arrays[first_weight + 8:first_weight + 10])
        else:
            rows, w_x_used = x2, self.w_x
        # 1/sqrt(d) goes into the q rows of the small weight matrix, not over the big q.
        self.row_scale = xp.ones(w_x_used.shape[0], dtype=x.dtype)
        self.row_scale[:d_model] = 1.0 / math.sqrt(d_model // heads)
        self.w_x_used = w_x_used * self.row_scale[:, None]
        b_x = b_x * self.row_scale
        projected = matmul(rows, self.w_x_used.T)
        projected += b_x
        if cross:
            c2 = context.reshape(-1, d_model)
            self.w_kv = xp.concatenate([wk, wv])
            kv2 = matmul(c2, self.w_kv.T)
            kv2 += xp.concatenate([bk, bv])
            q2, k2, v2 = projected, kv2[:, :d_model], kv2[:, d_model:]
        else:
            c2 = rows
            q2, k2, v2 = projected[:, :d_model], projected[:, d_model:2 * d_model], projected[:, 2 * d_model:]
        q_scaled = _heads_view(q2, batch, length, heads)
        k = _heads_view(k2, batch, source_length, heads)
        v = _heads_view(v2, batch, source_length, heads)
        # The scores' right operand is copied contiguous: a doubly transposed view makes the batched GEMM slow.
        k_t = xp.ascontiguousarray(k.swapaxes(-1, -2))
        mask_bias = additive_mask(xp, allowed, x.dtype)
        merged = xp.empty((batch * length, d_model), dtype=x.dtype)
        _, weights, attended = attention_forward(xp, q_scaled, k_t, v, mask_bias, keep_scale,
                                                 out=_heads_view(merged, batch, length, heads))
        y = matmul(merged, wo.T)
        y += bo
        if add_input:
            y += x2
        if weights_sink is not None:
            weights_sink.append(weights)
        self.saved = (rows, c2, q_scaled, k, v, weights, attended, merged, keep_scale, wo)
        return y.reshape(batch, length, d_model)

    def backward(self, grad):
        refuse_create_graph("fused multi-head attention", "MultiHeadAttention(..., fused=False)")
        xp = self.xp
        rows, c2, q_scaled, k, v, weights, attended, merged, keep_scale, wo = self.saved
        g2 = grad.data.reshape(merged.shape)
        grad_wo, grad_bo = matmul(g2.T, merged), column_sum(xp, g2)
        batch, heads, length, _ = q_scaled.shape
        source_length, d_model = k.shape[2], merged.shape[1]
        grad_out = _heads_view(matmul(g2, wo), batch, length, heads)
        # Gradients of q, k and v land side by side, as the stacked projection produced them.
        grad_projected = xp.empty((rows.shape[0], d_model if self.cross else 3 * d_model), dtype=rows.dtype)
        grad_kv = xp.empty((c2.shape[0], 2 * d_model), dtype=rows.dtype) if self.cross else grad_projected[:, d_model:]
        grads_into = (_heads_view(grad_projected[:, :d_model], batch, length, heads),
                      _heads_view(grad_kv[:, :d_model], batch, source_length, heads),
                      _heads_view(grad_kv[:, d_model:], batch, source_length, heads))
        attention_backward(xp, grad_out, q_scaled, k, v, weights, attended, keep_scale, grads_into)
        grad_rows = matmul(grad_projected, self.w_x_used)
        grad_w_x, grad_b_x = matmul(grad_projected.T, rows), column_sum(xp, grad_projected)
        grad_w_x *= self.row_scale[:, None]  # back from the scaled q rows to the weights as given
        grad_b_x *= self.row_scale
        norm_grads = ()
        if self.norm:
            norm_weight, norm_bias = (t.data for t in self.inputs[-2:])
            grad_w_x, grad_b_x, *norm_grads = unfold_norm_grads(self.w_x, norm_weight, norm_bias, grad_w_x, grad_b_x)
            grad_rows = normalize_rows_backward(xp, grad_rows, rows, self.inverse_std)
        if self.add_input:
            grad_rows += g2
        leading = [grad_rows]
        if self.cross:
            leading.append(matmul(grad_kv, self.w_kv))
            grad_w_in = xp.concatenate([grad_w_x, matmul(grad_kv.T, c2)])
            grad_b_in = xp.concatenate([grad_b_x, column_sum(xp, grad_kv)])
        else:
            grad_w_in, grad_b_in = grad_w_x, grad_b_x
        weight_grads = []
        for part in range(3):
            part_rows = slice(part * d_model, (part + 1) * d_model)
            weight_grads += [grad_w_in[part_rows], grad_b_in[part_rows]]
        shaped = [g.reshape(t.shape) for g, t in zip(leading, self.inputs)]
        return tuple(constant(g) for g in (*shaped, *weight_grads, grad_wo, grad_bo, *norm_grads))


class FusedFeedForward(Function):
    """[LayerNorm,] Linear, ReLU, (dropout,) Linear [, + x] as one Function, the ReLU in place.

    Inputs x, W1, b1, W2, b2, and the norm's weight and bias when norm_eps is given (the
    norm's scale and shift are folded into W1, b1: see fold_norm). add_input adds x to
    the output (the residual connection); keep_scale is the dropout mask or None.
    Twin: nn.FeedForward(..., fused=False) after the LayerNorm module, composed from ops.
    """

    def forward(self, x, w1, b1, w2, b2, *norm_parameters, norm_eps=None, add_input=False, keep_scale=None):
        xp = self.xp
        rows = x.reshape(-1, x.shape[-1])
        self.norm = norm_eps is not None
        if self.norm:
            inputs, self.inverse_std = normalize_rows(xp, rows, norm_eps)
            w1, b1 = fold_norm(w1, b1, *norm_parameters)
        else:
            inputs = rows
        hidden = matmul(inputs, w1.T)
        hidden += b1
        xp.maximum(hidden, 0, out=hidden)
        # The ReLU's mask, kept as bools: multiplying by it in backward is half the cost of remaking it there.
        self.active = hidden > 0
        dropped = hidden * keep_scale.reshape(hidden.shape) if keep_scale is not None else hidden
        out = matmul(dropped, w2.T)
        out += b2
        if add_input:
            out += rows
        self.add_input, self.w1_used = add_input, w1
        self.inputs_used, self.dropped, self.keep_scale = inputs, dropped, keep_scale
        return out.reshape(x.shape[:-1] + (w2.shape[0],))

    def backward(self, grad):
        refuse_create_graph("fused feed-forward", "FeedForward(..., fused=False)")
        xp = self.xp
        x, w1, _, w2 = (t.data for t in self.inputs[:4])
        g2 = grad.data.reshape(-1, grad.shape[-1])
        grad_w2, grad_b2 = matmul(g2.T, self.dropped), column_sum(xp, g2)
        grad_hidden = matmul(g2, w2)
        if self.keep_scale is not None:
            grad_hidden *= self.keep_scale.reshape(grad_hidden.shape)
        grad_hidden *= self.active  # ReLU passes gradient only where its input was positive
        grad_w1, grad_b1 = matmul(grad_hidden.T, self.inputs_used), column_sum(xp, grad_hidden)
        grad_x = matmul(grad_hidden, self.w1_used)
        norm_grads = ()
        if self.norm:
            grad_w1, grad_b1, *norm_grads = unfold_norm_grads(w1, self.inputs[5].data, self.inputs[6].data, grad_w1, grad_b1)
            grad_x = normalize_rows_backward(xp, grad_x, self.inputs_used, self.inverse_std)
        if self.add_input:
            grad_x += g2
        grads = (grad_x.reshape(x.shape), grad_w1, grad_b1, grad_w2, grad_b2, *norm_grads)
        return tuple(constant(g) for g in grads)


class FusedLayerNorm(Function):
    """LayerNorm over the last axis as one Function (twin: functional.layer_norm(..., fused=False)).

    Every row statistic is a matrix-vector product (see row_sum), and the backward
    takes the row sums of g*w and g*w*n as GEMVs with w, so that it makes only a few
    full-size passes over the data.
    """

    def forward(self, x, weight, bias, eps):
        self.normalized, self.inverse_std = normalize_rows(self.xp, x.reshape(-1, x.shape[-1]), eps)
        out = self.normalized * weight
        out += bias
        return out.reshape(x.shape)

    def backward(self, grad):
        refuse_create_graph("fused layer norm", "layer_norm(..., fused=False)")
        xp = self.xp
        g = grad.data.reshape(self.normalized.shape)
        g_times_n = g * self.normalized
        grad_weight, grad_bias = column_sum(xp, g_times_n), column_sum(xp, g)
        grad_x = normalize_rows_backward(xp, g, self.normalized, self.inverse_std, self.inputs[1].data, g_times_n)
        return constant(grad_x.reshape(grad.shape)), constant(grad_weight), constant(grad_bias)


class FusedCrossEntropyRows(Function):
    """Per-row cross-entropy of (N, C) logits with label smoothing, ignored rows zero.

    Twin: functional.cross_entropy(..., fused=False), built from log_softmax and indexing.
    """

    def forward(self, logits, targets, keep, smoothing):
        xp = self.xp
        rows = xp.arange(logits.shape[0])
        shifted = logits - row_max(xp, logits)
        log_probs = shifted - xp.log(row_sum(xp, xp.exp(shifted)))
        losses = -(1.0 - smoothing) * log_probs[rows, targets]
        if smoothing:
            losses -= smoothing * row_sum(xp, log_probs)[:, 0] * (1.0 / logits.shape[1])
        losses *= keep
        self.log_probs, self.targets, self.keep, self.smoothing, self.rows = log_probs, targets, keep, smoothing, rows
        return losses

    def backward(self, grad):
        refuse_create_graph("fused cross-entropy", "cross_entropy(..., fused=False)")
        xp = self.xp
        # d loss_i / d logits_i = softmax_i - target distribution_i
        grad_logits = xp.exp(self.log_probs)
        grad_logits[self.rows, self.targets] -= 1.0 - self.smoothing
        if self.smoothing:
            grad_logits -= self.smoothing / grad_logits.shape[1]
        grad_logits *= (grad.data * self.keep)[:, None]
        return constant(grad_logits)


def _sigmoid_inplace(xp, a):
    """Logistic sigmoid in place, as 0.5 * tanh(0.5 a) + 0.5: no overflow for large |a|."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


class FusedGRUCell(Function):
    """One GRU step, both projections included, as one Function (twin: nn.GRUCell(fused=False)).

    Inputs x (B, in), h (B, H), W_ih (3H, in), b_ih, W_hh (3H, H), b_hh; gates in the
    order reset, update, candidate, as in PyTorch.
    """

    def forward(self, x, h, w_ih, b_ih, w_hh, b_hh):
        xp = self.xp
        size = h.shape[1]
        gates_x = matmul(x, w_ih.T)
        gates_x += b_ih
        gates_h = matmul(h, w_hh.T)
        gates_h += b_hh
        reset_update = _sigmoid_inplace(xp, gates_x[:, :2 * size] + gates_h[:, :2 * size])
        reset, update = reset_update[:, :size], reset_update[:, size:]
        candidate = gates_h[:, 2 * size:] * reset
        candidate += gates_x[:, 2 * size:]
        xp.tanh(candidate, out=candidate)
        out = h - candidate
        out *= update
        out += candidate
        self.saved = (reset_update, candidate, gates_h[:, 2 * size:])
        return out

    def backward(self, grad):
        refuse_create_graph("fused GRU cell", "GRUCell(..., fused=False)")
        xp = self.xp
        x, h, w_ih, _, w_hh, _ = (t.data for t in self.inputs)
        reset_update, candidate, hidden_candidate = self.saved
        g = grad.data
        size = h.shape[1]
        reset, update = reset_update[:, :size], reset_update[:, size:]
        grad_gates_x = xp.empty((g.shape[0], 3 * size), dtype=g.dtype)
        grad_gates_h = xp.empty_like(grad_gates_x)
        # h' = n + z (h - n): dn = g (1 - z), dz = g (h - n), and g z flows straight to h
        grad_candidate = grad_gates_x[:, 2 * size:]
        xp.multiply(g, 1.0 - update, out=grad_candidate)
        grad_candidate *= 1.0 - candidate * candidate            # through tanh
        xp.multiply(grad_candidate, reset, out=grad_gates_h[:, 2 * size:])
        grad_reset_update = grad_gates_x[:, :2 * size]
        xp.multiply(grad_candidate, hidden_candidate, out=grad_reset_update[:, :size])  # dr
        xp.multiply(g, h - candidate, out=grad_reset_update[:, size:])                 # dz
        grad_reset_update *= reset_update * (1.0 - reset_update)  # through the sigmoids
        grad_gates_h[:, :2 * size] = grad_reset_update
        grad_h = g * update
        grad_h += matmul(grad_gates_h, w_hh)
        grads = (matmul(grad_gates_x, w_ih), grad_h, matmul(grad_gates_x.T, x), column_sum(xp, grad_gates_x),
                 matmul(grad_gates_h.T, h), column_sum(xp, grad_gates_h))
        return tuple(constant(g) for g in grads)


class FusedAdditiveAttention(Function):
    """Additive attention as one Function (twin: nn.AdditiveAttention(fused=False)).

    Inputs query (B, Q), keys (B, S, K), projected_keys (B, S, A), W_q (A, Q), score (A):
    energy = tanh(projected_keys + query W_q^T), weights = softmax_s(energy . score),
    context = sum_s weights_s keys_s. Returns the context; the weights leave through
    `weights_sink` when one is given.
    """

    def forward(self, query, keys, projected_keys, w_query, score, mask, weights_sink):
        xp = self.xp
        batch, length, size = projected_keys.shape
        energy = projected_keys + matmul(query, w_query.T)[:, None, :]
        xp.tanh(energy, out=energy)
        scores = matmul(energy.reshape(-1, size), score).reshape(batch, length)
        if mask is not None:
            scores = xp.where(mask, scores, MASKED_SCORE).astype(scores.dtype)
        scores -= row_max(xp, scores)
        weights = xp.exp(scores, out=scores)
        weights /= row_sum(xp, weights)
        if mask is not None:
            weights *= mask.any(axis=-1, keepdims=True)  # a row with no real key gets zeros
        if weights_sink is not None:
            weights_sink.append(weights)
        self.energy, self.weights = energy, weights
        return matmul(weights[:, None, :], keys)[:, 0]

    def backward(self, grad):
        refuse_create_graph("fused additive attention", "AdditiveAttention(..., fused=False)")
        xp = self.xp
        query, keys, _, w_query, score = (t.data for t in self.inputs)
        energy, weights = self.energy, self.weights
        g = grad.data
        batch, length, size = energy.shape
        grad_keys = weights[:, :, None] * g[:, None, :]
        grad_weights = matmul(keys, g[:, :, None])[:, :, 0]
        grad_scores = grad_weights
        grad_scores -= row_sum(xp, grad_weights * weights)
        grad_scores *= weights
        grad_score = matmul(grad_scores.reshape(-1), energy.reshape(-1, size))
        grad_energy = grad_scores[:, :, None] * score
        grad_energy *= 1.0 - energy * energy
        grad_query_projection = grad_energy.sum(axis=1)
        grads = (matmul(grad_query_projection, w_query), grad_keys, grad_energy,
                 matmul(grad_query_projection.T, query), grad_score)
        return tuple(constant(g) for g in grads)
