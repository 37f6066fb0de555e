"""Check analytical gradients against finite differences, in float64.

`gradcheck` compares the Jacobian that backward computes with one made by central
differences: in full (`fast=False`, every input element against every output element)
or along random directions (`fast=True`, one backward and two forwards per input,
for modules too large for a full Jacobian). `gradgradcheck` applies the same check to
the backward pass itself, which is how gradients of gradients are verified.
"""
import itertools

from . import backend
from .engine import Tensor, enable_grad, grad, no_grad


class GradcheckError(AssertionError):
    """Analytical and numerical gradients disagree (or backward misbehaves)."""


def _as_outputs(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _checked_inputs(inputs):
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck needs at least one input with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != backend.float64:
            raise ValueError(f"gradcheck needs float64 inputs (float32 rounding swamps finite differences); input {i} is {inputs[i].dtype}")
    return checked


def _flat_outputs(fn, inputs):
    """All outputs of fn, flattened and joined into one array, computed without a graph."""
    with no_grad():
        outputs = _as_outputs(fn(*inputs))
    xp = outputs[0].xp
    return xp.concatenate([o.data.reshape(-1).astype(backend.float64) for o in outputs])


def _vector_jacobian(outputs, inputs, checked, cotangents):
    """Gradients of sum(output * cotangent) for each checked input (zeros where unused)."""
    total = None
    for output, cotangent in zip(outputs, cotangents):
        term = (output * cotangent).sum()
        total = term if total is None else total + term
    grads = grad(total, [inputs[i] for i in checked], retain_graph=True, allow_unused=True)
    return [g.data if g is not None else inputs[i].xp.zeros_like(inputs[i].data) for g, i in zip(grads, checked)]


def _cotangents(outputs, values):
    """Split a flat vector into Tensors shaped like each output."""
    pieces, start = [], 0
    for output in outputs:
        stop = start + output.size
        pieces.append(Tensor._from_array(values[start:stop].reshape(output.shape).astype(output.dtype)))
        start = stop
    return pieces


def _close(analytical, numerical, atol, rtol):
    return abs(analytical - numerical) <= atol + rtol * abs(numerical)


def _check_backward_behaviour(outputs, inputs, checked, random_flat):
    """A zero output gradient gives zero input gradients; two passes give the same result."""
    xp = outputs[0].xp
    zero = _vector_jacobian(outputs, inputs, checked, _cotangents(outputs, xp.zeros_like(random_flat)))
    for g, i in zip(zero, checked):
        if bool((g != 0).any()):
            raise GradcheckError(f"backward of a zero output gradient gave a non-zero gradient for input {i}")
    cotangents = _cotangents(outputs, random_flat)
    first = _vector_jacobian(outputs, inputs, checked, cotangents)
    second = _vector_jacobian(outputs, inputs, checked, cotangents)
    for a, b, i in zip(first, second, checked):
        if not bool((a == b).all()):
            raise GradcheckError(f"two backward passes gave different gradients for input {i} (backward is not repeatable)")


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast=False, seed=0):
    """Raise GradcheckError unless backward agrees with central differences; else True.

    fn maps the inputs (Tensors; those with requires_grad=True must be float64) to a
    Tensor or a tuple of Tensors. Inputs are perturbed in place and restored.
    """
    inputs = list(inputs)
    checked = _checked_inputs(inputs)
    outputs = _as_outputs(fn(*inputs))
    if not any(o.requires_grad for o in outputs):
        raise GradcheckError("no output depends on an input that requires grad")
    rng = backend.generator(seed)
    xp = outputs[0].xp
    n_out = sum(o.size for o in outputs)
    random_flat = backend.to_device(rng.standard_normal(n_out), outputs[0].device)
    _check_backward_behaviour(outputs, inputs, checked, random_flat)
    if fast:
        _check_directional(fn, inputs, outputs, checked, random_flat, rng, eps, atol, rtol)
    else:
        _check_dense(fn, inputs, outputs, checked, n_out, xp, eps, atol, rtol)
    return True


def _check_dense(fn, inputs, outputs, checked, n_out, xp, eps, atol, rtol):
    analytical_rows = []
    for row in range(n_out):
        one_hot = xp.zeros(n_out)
        one_hot[row] = 1.0
        analytical_rows.append(_vector_jacobian(outputs, inputs, checked, _cotangents(outputs, one_hot)))
    for position, i in enumerate(checked):
        data = inputs[i].data
        for element in itertools.product(*(range(n) for n in data.shape)):
            original = data[element].item()
            data[element] = original + eps
            plus = _flat_outputs(fn, inputs)
            data[element] = original - eps
            minus = _flat_outputs(fn, inputs)
            data[element] = original
            column = (plus - minus) / (2 * eps)
            for row in range(n_out):
                numerical = column[row].item()
                analytical = analytical_rows[row][position][element].item()
                if not _close(analytical, numerical, atol, rtol):
                    raise GradcheckError(
                        f"gradient mismatch for input {i} (shape {data.shape}) at element {element}, output element {row}: "
                        f"analytical {analytical:.8g}, numerical {numerical:.8g}")


def _check_directional(fn, inputs, outputs, checked, cotangent_flat, rng, eps, atol, rtol):
    grads = _vector_jacobian(outputs, inputs, checked, _cotangents(outputs, cotangent_flat))
    for g, i in zip(grads, checked):
        data = inputs[i].data
        direction = backend.to_device(rng.standard_normal(data.shape), inputs[i].device)
        original = data.copy()
        data[...] = original + eps * direction
        plus = _flat_outputs(fn, inputs)
        data[...] = original - eps * direction
        minus = _flat_outputs(fn, inputs)
        data[...] = original
        numerical = ((plus - minus) / (2 * eps) * cotangent_flat).sum().item()
        analytical = (g * direction).sum().item()
        if not _close(analytical, numerical, atol, rtol):
            raise GradcheckError(
                f"gradient mismatch for input {i} (shape {data.shape}) along a random direction: "
                f"analytical {analytical:.8g}, numerical {numerical:.8g}")


def gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast=False, seed=0):
    """Check second derivatives: gradcheck of the map (inputs, v) -> v^T J(inputs)."""
    inputs = list(inputs)
    checked = _checked_inputs(inputs)
    outputs = _as_outputs(fn(*inputs))
    rng = backend.generator(seed + 1)
    cotangents = [Tensor(backend.to_device(rng.standard_normal(o.shape), o.device), requires_grad=True) for o in outputs]

    def first_derivatives(*args):
        primal, cotangent = list(args[:len(inputs)]), args[len(inputs):]
        total = None
        with enable_grad():  # the finite-difference passes run under no_grad, but a derivative needs its graph
            for output, v in zip(_as_outputs(fn(*primal)), cotangent):
                term = (output * v).sum()
                total = term if total is None else total + term
            grads = grad(total, [primal[i] for i in checked], create_graph=True, allow_unused=True)
        return tuple(g for g in grads if g is not None and g.requires_grad)

    return gradcheck(first_derivatives, [*inputs, *cotangents], eps=eps, atol=atol, rtol=rtol, fast=fast, seed=seed)
