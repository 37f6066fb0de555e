"""What the fused attention and feed-forward blocks share as pre-LN sublayers: reading their
input through a folded layer norm and adding the residual to their output; and, for
attention, moving packed token rows (tinyattn.packing) in and out of the padded layout
its heads need.

A packed input is one row per token, so a block on it computes no padding row at all.
The feed-forward block is position-wise and takes packed or padded rows alike;
attention scatters the token rows of its projections into a zero-padded (batch *
length) layout for the heads (put_rows), and gathers its output's token rows back
(take_rows): padding rows are then zero queries, keys and values, masked as keys.
"""
from ..engine import Function
from ..ops import scattered_rows
from . import rows


def take_rows(a2, token_rows):
    """The token rows of a 2-D array with a row per padded position; all of it for token_rows None."""
    return a2 if token_rows is None else a2[token_rows]


def put_rows(xp, part, token_rows, row_count):
    """`part`, an array of token rows, put back among all `row_count` padded positions, zeros at
    the padding; part itself for token_rows None."""
    return part if token_rows is None else scattered_rows(xp, part, token_rows, row_count)


class FusedSublayer(Function):
    """Base of the fused blocks that fold a leading norm (norm_eps given: their x is the
    norm's input) and add a residual in place. Subclasses call _input_rows and
    _add_residual in forward, and _input_grads in backward."""

    def _input_rows(self, x2, weight, bias, norm_weight, norm_bias, norm_eps):
        """x's rows as the first projection reads them, and that projection's (weight, bias) with
        the norm's scale and shift folded in (rows.fold_norm); as given without a norm."""
        self.norm = norm_eps is not None
        if not self.norm:
            return x2, weight, bias
        rows_in, self.inverse_std = rows.normalize_rows(self.xp, x2, norm_eps)
        self.first_weight, self.norm_weight, self.norm_bias = weight, norm_weight, norm_bias
        if bias is None:
            bias = self.xp.zeros(weight.shape[0], dtype=weight.dtype)
        weight, bias = rows.fold_norm(weight, bias, norm_weight, norm_bias)
        return rows_in, weight, bias

    def _add_residual(self, out2, x, residual):
        """The block's output rows out2 plus the residual, in place. A residual that is x itself (a
        pre-LN sublayer) is noted, so that backward sums x's two gradients."""
        self.residual = None if residual is None else ("x" if residual is x else residual.shape)
        if residual is not None:
            out2 += residual.reshape(out2.shape)
        return out2

    def _input_grads(self, grad_rows, rows_in, grad_weight, grad_bias, grad_out2):
        """From the gradients of the rows the first projection read and of its folded weights:
        those of x's rows, of that projection's (weight, bias), of the norm's (weight, bias)
        (None without a norm) and of the residual (None without one, or when it is x).
        grad_out2: the gradient of the block's output rows."""
        grad_norm_weight = grad_norm_bias = grad_residual = None
        if self.norm:
            grad_weight, grad_bias, grad_norm_weight, grad_norm_bias = rows.unfold_norm_grads(
                self.first_weight, self.norm_weight, self.norm_bias, grad_weight, grad_bias)
            grad_rows = rows.normalize_rows_backward(self.xp, grad_rows, rows_in, self.inverse_std)
        if self.residual == "x":
            grad_rows += grad_out2
        elif self.residual is not None:
            grad_residual = grad_out2.reshape(self.residual)
        return grad_rows, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias, grad_residual
