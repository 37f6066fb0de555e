"""Optimizers, gradient clipping and learning-rate schedules, following PyTorch's rules.

Optimizers change parameter arrays in place and build no graph: they work on `p.data`
and `p.grad.data` with array methods. Hyperparameters are kept as Python floats, which
NumPy and CuPy treat as weak scalars, so a float32 parameter and its state stay float32.
"""
import functools
import math

from . import backend, profiler
from .engine import Tensor


def _check_fraction(name, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_non_negative(name, value):
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: holds the parameters, the learning rate and per-parameter state.

    Subclasses name their hyperparameters in `hyperparameter_names` (saved by
    state_dict), build the state of one parameter in `_initial_state` and update one
    parameter that has a gradient in `_update`.
    """

    hyperparameter_names = ()
    # Hyperparameters added after state_dicts were first saved, with the value every older
    # state_dict had: a checkpoint without them still loads.
    later_hyperparameters = {}

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for index, param in enumerate(self.params):
            if not isinstance(param, Tensor):
                raise TypeError(f"optimizer parameter {index} is a {type(param).__name__}, expected a Tensor")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.lr = lr
        self.step_count = 0
        # State is made up front rather than on the first step, so state_dict always
        # covers every parameter and a checkpoint for another model is caught on load.
        self.state = [self._initial_state(param) for param in self.params]

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        # Schedules may decay to 0, so only negative values are refused here.
        self._lr = _check_non_negative("lr", value)

    def _initial_state(self, param):
        return {}

    def _update(self, param, grad, state):
        raise NotImplementedError

    def zero_grad(self):
        for param in self.params:
            param.grad = None

    def step(self):
        """Update every parameter that has a gradient; those whose grad is None are left alone."""
        self.step_count += 1
        with profiler.region(f"{type(self).__name__}.step"):
            self._update_all()

    def _update_all(self):
        for param, state in zip(self.params, self.state):
            if param.grad is not None:
                self._update(param, param.grad.data, state)

    def state_dict(self):
        """Step count, lr, hyperparameters and copies of the state arrays (they stay on their device)."""
        return {
            "step": self.step_count,
            "lr": self.lr,
            **{name: getattr(self, name) for name in self.hyperparameter_names},
            "state": {str(index): {name: value.copy() if backend.is_array(value) else value for name, value in state.items()}
                      for index, state in enumerate(self.state)},
        }

    def load_state_dict(self, state_dict):
        """Restore what state_dict() returned; arrays are copied onto each parameter's device and dtype."""
        missing = [key for key in ("step", "lr", "state", *self.hyperparameter_names)
                   if key not in state_dict and key not in self.later_hyperparameters]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state_dict lacks {missing} (saved from another optimizer type?)")
        saved = state_dict["state"]
        if sorted(saved) != sorted(str(index) for index in range(len(self.params))):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state_dict has state for {len(saved)} parameters, "
                             f"this optimizer has {len(self.params)}")
        restored = [self._restored_state(index, param, saved[str(index)]) for index, param in enumerate(self.params)]
        self.step_count = state_dict["step"]
        self.lr = state_dict["lr"]
        for name in self.hyperparameter_names:
            setattr(self, name, state_dict[name] if name in state_dict else self.later_hyperparameters[name])
        for state, values in zip(self.state, restored):
            for name, value in values.items():
                if backend.is_array(value) and name in state:
                    state[name][...] = value  # in place: the state arrays may be views of one flat buffer
                else:
                    state[name] = value

    def _restored_state(self, index, param, saved):
        state = {}
        for name, value in saved.items():
            if backend.is_array(value):
                if value.shape != param.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {name!r} of parameter {index} has shape {value.shape}, "
                                     f"the parameter has shape {param.shape}")
                value = backend.as_array(value, param.dtype, param.device)
            state[name] = value
        return state


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and
    L2 weight decay, by PyTorch's rule: the buffer starts as the first gradient, then
    b = momentum*b + (1 - dampening)*g, and the step is g + momentum*b with Nesterov, else b."""

    hyperparameter_names = ("momentum", "weight_decay", "dampening", "nesterov")
    later_hyperparameters = {"dampening": 0.0, "nesterov": False}

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.momentum = _check_fraction("momentum", momentum)
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
        self.dampening = float(dampening)
        self.weight_decay = _check_non_negative("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ValueError(f"Nesterov momentum needs momentum > 0 and dampening 0, got momentum={momentum!r}, "
                             f"dampening={dampening!r}")
        self.nesterov = nesterov
        super().__init__(params, lr)

    def _initial_state(self, param):
        # A zero buffer makes the first step's buffer momentum*0 + g = g, as PyTorch's; with
        # dampening it would be (1 - dampening)*g, so that first step is marked instead.
        if not self.momentum:
            return {}
        state = {"momentum": param.xp.zeros_like(param.data)}
        if self.dampening:
            state["momentum_started"] = False
        return state

    def _update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        if self.momentum:
            buffer = state["momentum"]
            if not self.dampening:
                buffer *= self.momentum
                buffer += grad
            elif state.get("momentum_started", True):
                buffer *= self.momentum
                buffer += (1.0 - self.dampening) * grad
            else:
                buffer[...] = grad
                state["momentum_started"] = True
            grad = grad + self.momentum * buffer if self.nesterov else buffer
        param.data -= self.lr * grad


class Adam(Optimizer):
    """Adam with bias-corrected moments; weight decay is L2, added to the gradient (PyTorch's Adam).

    The moments of all parameters of one device and dtype live in one flat buffer each,
    so a step is a dozen operations on long arrays rather than a dozen per parameter;
    each parameter's state holds views of its part. Parameters whose gradients are all
    present and whose step counts agree are updated together this way; otherwise each
    is updated on its own, by the same arithmetic.

    amsgrad=True keeps the running maximum of the second moment (`max_exp_avg_sq`, PyTorch's
    name) and divides by its square root instead, as torch.optim.Adam(amsgrad=True).
    """

    hyperparameter_names = ("betas", "eps", "weight_decay", "amsgrad")
    later_hyperparameters = {"amsgrad": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        beta1, beta2 = betas
        self.betas = (_check_fraction("betas[0]", beta1), _check_fraction("betas[1]", beta2))
        self.eps = _check_non_negative("eps", eps)
        self.weight_decay = _check_non_negative("weight_decay", weight_decay)
        if not isinstance(amsgrad, bool):
            raise TypeError(f"amsgrad must be True or False, got {amsgrad!r}")
        self.amsgrad = amsgrad
        super().__init__(params, lr)
        self.groups = self._flat_groups()

    def _moment_names(self):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if self.amsgrad else ("exp_avg", "exp_avg_sq")

    def _initial_state(self, param):
        # Each parameter counts its own steps, as in PyTorch, so one that first gets a
        # gradient late still has its moments bias-corrected from their true start.
        return {"step": 0, **{name: param.xp.zeros_like(param.data) for name in self._moment_names()}}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.amsgrad and any("max_exp_avg_sq" not in flat for _, flat in self.groups):
            self.groups = self._flat_groups()  # amsgrad switched on by the state_dict: its maxima join the flat buffers

    def _flat_groups(self):
        """Parameter indices grouped by (device, dtype), each group's moments moved (values
        kept) into one flat buffer per moment."""
        members = {}
        for index, param in enumerate(self.params):
            members.setdefault((param.device, param.dtype), []).append(index)
        groups = []
        for indices in members.values():
            xp = self.params[indices[0]].xp
            total = sum(self.params[i].size for i in indices)
            flat = {name: xp.zeros(total, dtype=self.params[indices[0]].dtype) for name in self._moment_names()}
            offset = 0
            for i in indices:
                size, shape = self.params[i].size, self.params[i].shape
                for name, buffer in flat.items():
                    part = buffer[offset:offset + size].reshape(shape)
                    if name in self.state[i]:
                        part[...] = self.state[i][name]
                    self.state[i][name] = part
                offset += size
            groups.append((indices, flat))
        return groups

    def _decayed(self, params, grad):
        """L2 weight decay: the gradient plus weight_decay times the parameters (flattened like grad)."""
        xp = params[0].xp
        values = params[0].data if len(params) == 1 else xp.concatenate([p.data.reshape(-1) for p in params])
        return grad + self.weight_decay * values.reshape(grad.shape)

    def _step_size_and_update(self, grad, exp_avg, exp_avg_sq, step, xp, max_exp_avg_sq=None):
        beta1, beta2 = self.betas
        squared = grad * grad
        squared *= 1.0 - beta2
        exp_avg_sq *= beta2
        exp_avg_sq += squared
        xp.multiply(grad, 1.0 - beta1, out=squared)  # reuse the buffer: grad itself may be the caller's
        exp_avg *= beta1
        exp_avg += squared
        if max_exp_avg_sq is not None:  # amsgrad: PyTorch takes the maximum of v itself, before bias correction
            xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            exp_avg_sq = max_exp_avg_sq
        # Same arrangement as PyTorch: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), which
        # equals lr * m_hat / (sqrt(v_hat) + eps) without making m_hat or v_hat.
        denominator = xp.sqrt(exp_avg_sq)
        denominator /= math.sqrt(1.0 - beta2 ** step)
        denominator += self.eps
        update = (self.lr / (1.0 - beta1 ** step)) * exp_avg
        update /= denominator
        return update

    def _update(self, param, grad, state):
        if self.weight_decay:
            grad = self._decayed([param], grad)
        state["step"] += 1
        param.data -= self._step_size_and_update(grad, state["exp_avg"], state["exp_avg_sq"], state["step"], param.xp,
                                                 state["max_exp_avg_sq"] if self.amsgrad else None)

    def _update_all(self):
        for indices, flat in self.groups:
            params = [self.params[i] for i in indices]
            steps = {self.state[i]["step"] for i in indices}
            if any(p.grad is None for p in params) or len(steps) > 1:
                for p, i in zip(params, indices):
                    if p.grad is not None:
                        self._update(p, p.grad.data, self.state[i])
                continue
            xp = params[0].xp
            grad = xp.concatenate([p.grad.data.reshape(-1) for p in params])
            if self.weight_decay:
                grad = self._decayed(params, grad)
            step = steps.pop() + 1
            for i in indices:
                self.state[i]["step"] = step
            update = self._step_size_and_update(grad, flat["exp_avg"], flat["exp_avg_sq"], step, xp,
                                                flat["max_exp_avg_sq"] if self.amsgrad else None)
            offset = 0
            for p in params:
                p.data -= update[offset:offset + p.size].reshape(p.shape)
                offset += p.size


class AdamW(Adam):
    """Adam with decoupled weight decay: the parameter shrinks by lr*weight_decay before the update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)

    def _decayed(self, params, grad):
        for param in params:
            param.data *= 1.0 - self.lr * self.weight_decay
        return grad


def _total_norm(arrays, norm_type):
    """The `norm_type`-norm of all of `arrays` together, a 0-d float64 array on their device."""
    xp = backend.array_module(arrays[0])
    if norm_type == 2.0:
        terms = [(a * a).sum(dtype=backend.float64) for a in arrays]
    elif norm_type == math.inf:
        terms = [xp.abs(a).max().astype(backend.float64) for a in arrays if a.size] or [xp.zeros((), backend.float64)]
        return backend.ensure_array(functools.reduce(xp.maximum, terms))  # maximum, like max, keeps a NaN
    elif norm_type == 1.0:
        terms = [xp.abs(a).sum(dtype=backend.float64) for a in arrays]
    else:
        terms = [(xp.abs(a) ** norm_type).sum(dtype=backend.float64) for a in arrays]
    total = sum(terms[1:], terms[0])
    return backend.ensure_array(total if norm_type == 1.0 else total ** (1.0 / norm_type))


def clip_grad_norm_(params, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale all gradients so their joint `norm_type`-norm is at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_. `params` is one tensor or an iterable of them; those
    whose grad is None are skipped. norm_type: 2 (the default), inf (the largest absolute
    value) or any p > 0.

    Returns the norm before clipping as a 0-d float64 tensor, as PyTorch does: it stays on
    the gradients' device, so clipping never waits for a GPU (read it with .item()). Each
    gradient's squares are summed in float64, so a float32 gradient makes no float64 copy
    and keeps its dtype.

    A NaN or infinite norm scales the gradients as PyTorch's does (a NaN norm makes them
    all NaN, an infinite one zeroes the finite entries). With error_if_nonfinite=True it
    raises a RuntimeError instead and leaves the gradients alone; deciding that reads the
    norm back, so on a GPU that call waits for the device (the default never does).

    Gradients are scaled in place where the engine made them for this backward (the usual
    case). One that is part of a graph (backward(create_graph=True)), read-only, or a view
    of another array is replaced in `.grad` by a scaled copy instead, so nothing it shares
    is written to.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (2, inf or any p > 0), got {norm_type!r}")
    if isinstance(params, Tensor):
        params = (params,)
    with_grads = [param for param in params if param.grad is not None]
    if not with_grads:
        return Tensor._from_array(backend.as_array(0.0, backend.float64))
    total_norm = _total_norm([param.grad.data for param in with_grads], norm_type)
    if error_if_nonfinite:
        value = total_norm.item()  # the one read back from the device, asked for by this option
        if not math.isfinite(value):
            raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {value} (non-finite), "
                               f"so they cannot be clipped; pass error_if_nonfinite=False to scale them by it anyway")
    # min(1, max_norm / norm) on the device, applied to every gradient: a no-op (times 1.0) below max_norm.
    scale = with_grads[0].grad.xp.minimum(max_norm / (total_norm + 1e-6), 1.0)
    in_place = {}
    for param in with_grads:  # copies first, from the unscaled values, then the in-place scaling
        grad = param.grad
        data = grad.data
        if grad._ctx is None and not grad.requires_grad and data.base is None and getattr(data.flags, "writeable", True):
            in_place[id(data)] = data  # once each: under create_graph one gradient may be several parameters'
        else:
            param.grad = Tensor._from_array(data * scale.astype(data.dtype))
    for data in in_place.values():
        data *= scale.astype(data.dtype)
    return Tensor._from_array(total_norm)


class LRSchedule:
    """Base class: sets `optimizer.lr` from `get_lr(step)` for 1-based optimizer steps.

    The base lr is the optimizer's lr at construction. Constructing sets the lr for step
    1; call `step()` after each `optimizer.step()` to move to the next one.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.current_step = 1  # the optimizer step that the current lr is for
        self._set_lr()

    def get_lr(self, step):
        """The lr for the 1-based optimizer step `step`."""
        if step < 1:
            raise ValueError(f"{type(self).__name__}.get_lr: steps count from 1, got {step!r}")
        return self._lr_at(step)

    def _lr_at(self, step):
        raise NotImplementedError

    def _set_lr(self):
        self.last_lr = self.get_lr(self.current_step)
        self.optimizer.lr = self.last_lr

    def step(self):
        self.current_step += 1
        self._set_lr()

    def state_dict(self):
        return {"step": self.current_step, "base_lr": self.base_lr}

    def load_state_dict(self, state_dict):
        self.current_step = state_dict["step"]
        self.base_lr = state_dict["base_lr"]
        self._set_lr()


class WarmupCosine(LRSchedule):
    """Linear warmup from base_lr/warmup_steps to base_lr at step warmup_steps, then cosine
    decay to min_lr at step total_steps, and min_lr after that."""

    def __init__(self, optimizer, warmup_steps, total_steps, min_lr=0.0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if not total_steps > warmup_steps:
            raise ValueError(f"total_steps must be > warmup_steps ({warmup_steps!r}), got {total_steps!r}")
        if not 0.0 <= min_lr <= optimizer.lr:
            raise ValueError(f"min_lr must be in [0, base lr {optimizer.lr!r}], got {min_lr!r}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = float(min_lr)
        super().__init__(optimizer)

    def _lr_at(self, step):
        if step <= self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class InverseSqrt(LRSchedule):
    """The Transformer's (Noam) schedule: linear warmup to base_lr at step warmup_steps,
    then base_lr * sqrt(warmup_steps / step)."""

    def __init__(self, optimizer, warmup_steps):
        # warmup_steps = 0 would make every lr after warmup base_lr * sqrt(0) = 0.
        if not warmup_steps >= 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def _lr_at(self, step):
        if step <= self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        return self.base_lr * math.sqrt(self.warmup_steps / step)
