"""The recurrent kernels: one GRU step, and additive (Bahdanau) attention.

    gru_cell_composed            PyTorch's GRUCell equations from engine ops (the reference)
    FusedGRUCell                 the step, both projections included, as one Function
    gru_cell                     picks one of them by the kernels switch

    additive_attention_composed  score = v . tanh(W_q q + W_k k), softmax, weighted sum (the reference)
    FusedAdditiveAttention       the same as one Function; outputs (context, weights)
    additive_attention           picks one of them by the kernels switch
"""
from ..backend import matmul
from ..engine import Function
from ..ops import constant, linear, where
from . import fused_selected, rows
from .softmax import softmax


def gru_cell_composed(x, h, weight_ih, bias_ih, weight_hh, bias_hh):
    """The next hidden state: r, z = sigmoid(...), n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), (1 - z) n + z h."""
    gates_x = linear(x, weight_ih, bias_ih)
    gates_h = linear(h, weight_hh, bias_hh)
    size = h.shape[1]
    reset = (gates_x[:, :size] + gates_h[:, :size]).sigmoid()
    update = (gates_x[:, size:2 * size] + gates_h[:, size:2 * size]).sigmoid()
    candidate = (gates_x[:, 2 * size:] + reset * gates_h[:, 2 * size:]).tanh()
    return candidate + update * (h - candidate)  # = (1 - z) * n + z * h, one op shorter


def gru_cell(x, h, weight_ih, bias_ih, weight_hh, bias_hh):
    """One GRU step, FusedGRUCell or gru_cell_composed by the kernels switch."""
    if fused_selected():
        return FusedGRUCell.apply(x, h, weight_ih, bias_ih, weight_hh, bias_hh)
    return gru_cell_composed(x, h, weight_ih, bias_ih, weight_hh, bias_hh)


def additive_attention_composed(query, keys, projected_keys, query_weight, score, allowed=None):
    energy = (projected_keys + linear(query, query_weight)[:, None, :]).tanh()
    scores = energy @ score  # (B, S)
    if allowed is not None:
        scores = where(constant(allowed), scores, rows.MASKED_SCORE)
    weights = softmax(scores, axis=-1)
    if allowed is not None:
        weights = weights * constant(rows.rows_with_a_key(allowed, weights.dtype))
    return (weights[:, None, :] @ keys)[:, 0], weights


def additive_attention(query, keys, projected_keys, query_weight, score, mask=None):
    """Context (B, K) and weights (B, S) of additive attention; mask (B, S) boolean, True = a
    real key. FusedAdditiveAttention or additive_attention_composed by the kernels switch."""
    allowed = None if mask is None else mask.data
    if fused_selected():
        return FusedAdditiveAttention.apply(query, keys, projected_keys, query_weight, score, allowed=allowed)
    return additive_attention_composed(query, keys, projected_keys, query_weight, score, allowed)


def _sigmoid_inplace(xp, a):
    """Logistic sigmoid in place, as 0.5 * tanh(0.5 a) + 0.5: no overflow for large |a|."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


class FusedGRUCell(Function):
    """One GRU step, both projections included, as one Function (reference: gru_cell_composed).

    Inputs x (B, in), h (B, H), W_ih (3H, in), b_ih, W_hh (3H, H), b_hh; gates in the
    order reset, update, candidate, as in PyTorch.
    """

    def forward(self, x, h, w_ih, b_ih, w_hh, b_hh):
        xp = self.xp
        self.x, self.h, self.w_ih, self.w_hh = x, h, w_ih, w_hh
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
        rows.refuse_create_graph("fused GRU cell")
        xp = self.xp
        x, h, w_ih, w_hh = self.x, self.h, self.w_ih, self.w_hh
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
        grads = (matmul(grad_gates_x, w_ih), grad_h, matmul(grad_gates_x.T, x), rows.column_sum(xp, grad_gates_x),
                 matmul(grad_gates_h.T, h), rows.column_sum(xp, grad_gates_h))
        return tuple(constant(g) for g in grads)


class FusedAdditiveAttention(Function):
    """Additive attention as one Function, outputs (context, weights) (reference: additive_attention_composed).

    Inputs query (B, Q), keys (B, S, K), projected_keys (B, S, A), W_q (A, Q), score (A):
    energy = tanh(projected_keys + query W_q^T), weights = softmax_s(energy . score),
    context = sum_s weights_s keys_s.
    """

    def forward(self, query, keys, projected_keys, w_query, score, *, allowed):
        xp = self.xp
        batch, length, size = projected_keys.shape
        energy = projected_keys + matmul(query, w_query.T)[:, None, :]
        xp.tanh(energy, out=energy)

        def scores():
            values = matmul(energy.reshape(-1, size), score).reshape(batch, length)
            return values if allowed is None else xp.where(allowed, values, rows.MASKED_SCORE).astype(values.dtype)

        weights = rows.softmax(xp, scores(), scores, allowed)
        self.query, self.keys, self.w_query, self.score = query, keys, w_query, score
        self.energy, self.weights = energy, weights
        return matmul(weights[:, None, :], keys)[:, 0], weights

    def backward(self, grad_context, grad_weights):
        rows.refuse_create_graph("fused additive attention")
        xp = self.xp
        query, keys, w_query, score = self.query, self.keys, self.w_query, self.score
        energy, weights = self.energy, self.weights
        batch, length, size = energy.shape
        g = xp.zeros((batch, keys.shape[-1]), dtype=keys.dtype) if grad_context is None else grad_context.data
        grad_keys = weights[:, :, None] * g[:, None, :]
        grad_weights_total = matmul(keys, g[:, :, None])[:, :, 0]
        if grad_weights is not None:
            grad_weights_total += grad_weights.data
        grad_scores = grad_weights_total
        grad_scores -= rows.row_sum(xp, grad_weights_total * weights)
        grad_scores *= weights
        grad_score = matmul(grad_scores.reshape(-1), energy.reshape(-1, size))
        grad_energy = grad_scores[:, :, None] * score
        grad_energy *= 1.0 - energy * energy
        grad_query_projection = grad_energy.sum(axis=1)
        grads = (matmul(grad_query_projection, w_query), grad_keys, grad_energy,
                 matmul(grad_query_projection.T, query), grad_score)
        return tuple(constant(g) for g in grads)
