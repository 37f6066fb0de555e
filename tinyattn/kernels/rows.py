"""The array pieces the kernels share: softmax, log-softmax, the masked-row rule, row sums and
row normalisation. Each exists once; the composed references and the fused Functions call them.

Two NumPy facts shape them (benchmarks/ and docs/performance.md): a reduction over a
short last axis is several times slower than the same sum as a matrix-vector product,
and an elementwise pass per column beats NumPy's per-row reduction for the maximum of
rows with few columns.
"""
import functools

from .. import backend
from ..backend import matmul
from ..engine import is_grad_enabled

MASKED_SCORE = -1e9  # exp(MASKED_SCORE - max) is exactly 0 in float32 and float64
UNDERFLOW_GUARD = 1e-30  # a softmax row sum below this means its terms underflowed
EXP_SAFE = 60.0  # exp(60) * a few hundred terms stays far below float32's largest value
FEW_COLUMNS = 32  # up to this many columns, row_max takes one pass per column


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


def reads_are_free(array):
    """Whether reading a value of `array` back to Python costs nothing. On the host it does
    not; on a GPU it waits for everything queued before it (a synchronisation), so the
    kernels take a path there that decides nothing from the data."""
    return backend.device_of(array) == "cpu"


def row_max(xp, a2):
    """Maximum of each row of a 2-D array, as an (N, 1) column."""
    if a2.shape[1] > FEW_COLUMNS or not reads_are_free(a2):  # on a GPU one reduction is one kernel; a loop is many
        return a2.max(axis=1, keepdims=True)
    top = a2[:, 0].copy()
    for column in range(1, a2.shape[1]):
        xp.maximum(top, a2[:, column], out=top)
    return top[:, None]


def rows_with_a_key(allowed, dtype):
    """The masked-row rule: 1 for a query that may attend to at least one key, 0 for one whose
    keys are all masked, which then gets no weight at all rather than a uniform average."""
    return allowed.any(axis=-1, keepdims=True).astype(dtype)


def softmax(xp, scores, remake_scores, allowed=None):
    """Softmax over the last axis, in place: `scores` becomes the weights, which are returned.

    The shift subtracts the single largest score, not each row's own maximum, because one
    full reduction is far cheaper than one per short row (and none at all when exp cannot
    overflow). A row whose terms underflow against it (a row far below the rest, or one
    that is fully masked) shows as a tiny row sum; that is rare, and then the weights are
    made again from `remake_scores()`, each row shifted by its own maximum, with the
    masked-row rule applied for the boolean may-attend mask `allowed`.

    On a GPU, where reading the largest score back would synchronise, every row is shifted
    by its own maximum at once: one reduction kernel, no decision on the host.
    """
    if not reads_are_free(scores):
        return _softmax_per_row(xp, scores, allowed)
    top = float(scores.max())
    if top > EXP_SAFE:
        scores -= top
    weights = xp.exp(scores, out=scores)
    sums = row_sum(xp, weights)
    if not bool((sums < UNDERFLOW_GUARD).any()):
        weights /= sums
        return weights
    return _softmax_per_row(xp, remake_scores(), allowed)


def _softmax_per_row(xp, scores, allowed):
    """Softmax of each row shifted by its own maximum, in place, with the masked-row rule."""
    scores -= scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores, out=scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    if allowed is not None:
        weights *= rows_with_a_key(allowed, weights.dtype)
    return weights


def log_softmax(xp, x2):
    """Log-softmax of each row of a 2-D array (a new array), shifted by each row's maximum."""
    shifted = x2 - row_max(xp, x2)
    shifted -= xp.log(row_sum(xp, xp.exp(shifted)))
    return shifted


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


def refuse_create_graph(name):
    """Fused backward rules work on arrays: gradients of gradients need the composed reference."""
    if is_grad_enabled():
        raise RuntimeError(f"{name} supports first-order gradients only; for gradients of gradients run the "
                           "composed reference: with tinyattn.kernels.use('composed'): ...")
