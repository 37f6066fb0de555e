"""What the fused attention and feed-forward blocks share as pre-LN sublayers: reading their
input through a folded layer norm, adding the residual to their output, and computing the
token rows alone.

Token rows: a padded batch of sequences of lengths 1..32 is about half padding, and a
position-wise layer's work on a padding row is thrown away (no loss term reads it, and
attention masks it as a key). Given `token_rows`, the flat indices (into batch * length)
of the rows that hold tokens, a fused block gathers those rows, runs its norm,
projections and activation on them alone, and puts the result back among every row: a
padding row of its output is the residual passing through unchanged (zero without a
residual), as if the block had added nothing there. The composed references compute
every row; the two paths agree on every token row, on the loss and on every gradient,
and differ only in padding rows.
"""
from .. import backend
from ..engine import Function, Tensor
from . import rows


def checked_token_rows(token_rows, x):
    """The array of token rows a fused block takes for x (batch, length, ...), or None to compute
    every row: for None, and for rows that name every position (a batch without padding)."""
    if token_rows is None:
        return None
    if not isinstance(token_rows, Tensor) or token_rows.ndim != 1 or not backend.is_integer(token_rows.dtype):
        raise TypeError(f"token_rows must be a 1-D integer tensor of row indices, got "
                        f"{getattr(token_rows, 'shape', type(token_rows).__name__)}")
    positions = x.shape[0] * x.shape[1]
    if token_rows.shape[0] > positions:
        raise ValueError(f"token_rows names {token_rows.shape[0]} rows, but x of shape {x.shape} has {positions}")
    return None if token_rows.shape[0] == positions else token_rows.data


def take_rows(a2, token_rows):
    """The token rows of a 2-D array with a row per position; all of it for token_rows None."""
    return a2 if token_rows is None else a2[token_rows]


def put_rows(xp, part, token_rows, row_count, base=None):
    """`part`, an array of the token rows, put back among all `row_count` rows: added to a copy
    of `base`, or to zeros without one. For token_rows None, part itself (base added in place)."""
    if token_rows is None:
        if base is not None:
            part += base
        return part
    full = xp.zeros((row_count, part.shape[1]), dtype=part.dtype)
    full[token_rows] = part
    if base is not None:
        # scatter into zeros, then one dense add: `base.copy()[token_rows] += part` gathers and
        # scatters again, and measured 96 against 22 us for 619 of 1088 rows of 64
        full += base
    return full


class FusedSublayer(Function):
    """Base of the fused blocks that fold a leading norm (norm_eps given: their x is the
    norm's input), add a residual in place, and may compute only the token rows. Subclasses
    call _input_rows and _add_residual in forward, and _input_grads in backward."""

    def _input_rows(self, x2, weight, bias, norm_weight, norm_bias, norm_eps, token_rows=None):
        """x's rows as the first projection reads them (only the token rows, when given), and that
        projection's (weight, bias) with the norm's scale and shift folded in (rows.fold_norm); as
        given without a norm."""
        self.norm, self.token_rows, self.row_count = norm_eps is not None, token_rows, x2.shape[0]
        x2 = self._token_rows_of(x2)
        if not self.norm:
            return x2, weight, bias
        rows_in, self.inverse_std = rows.normalize_rows(self.xp, x2, norm_eps)
        self.first_weight, self.norm_weight, self.norm_bias = weight, norm_weight, norm_bias
        if bias is None:
            bias = self.xp.zeros(weight.shape[0], dtype=weight.dtype)
        weight, bias = rows.fold_norm(weight, bias, norm_weight, norm_bias)
        return rows_in, weight, bias

    def _token_rows_of(self, a2):
        """The token rows of a 2-D array with a row per position of x; all of it without token rows."""
        return take_rows(a2, self.token_rows)

    def _all_rows(self, part, base=None):
        """An array of x's token rows put back among all of x's rows (see put_rows)."""
        return put_rows(self.xp, part, self.token_rows, self.row_count, base)

    def _add_residual(self, out2, x, residual):
        """The block's output over every row: out2 (its token rows) plus the residual. A residual
        that is x itself (a pre-LN sublayer) is noted, so that backward sums x's two gradients."""
        self.residual = None if residual is None else ("x" if residual is x else residual.shape)
        return self._all_rows(out2, None if residual is None else residual.reshape(self.row_count, out2.shape[1]))

    def _input_grads(self, grad_rows, rows_in, grad_weight, grad_bias, grad_out2):
        """From the gradients of the rows the first projection read and of its folded weights:
        those of x's rows (every row), of that projection's (weight, bias), of the norm's (weight,
        bias) (None without a norm) and of the residual (None without one, or when it is x).
        grad_out2: the gradient of the block's output, every row."""
        grad_norm_weight = grad_norm_bias = grad_residual = None
        if self.norm:
            grad_weight, grad_bias, grad_norm_weight, grad_norm_bias = rows.unfold_norm_grads(
                self.first_weight, self.norm_weight, self.norm_bias, grad_weight, grad_bias)
            grad_rows = rows.normalize_rows_backward(self.xp, grad_rows, rows_in, self.inverse_std)
        if self.residual == "x":
            grad_rows = self._all_rows(grad_rows, grad_out2)
        else:
            grad_rows = self._all_rows(grad_rows)
            if self.residual is not None:
                grad_residual = grad_out2.reshape(self.residual)
        return grad_rows, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias, grad_residual
