"""Module and Parameter: the containers that networks are built from, with PyTorch's habits.

A Module finds its parameters and submodules by looking at its own attributes, in the
order they were assigned; no registration calls are needed. Tensor attributes that are
not Parameters are buffers: they move with `.to(device)` but are not trained or saved.
"""
from .. import backend
from ..engine import Tensor


class Parameter(Tensor):
    """A Tensor that is a trainable weight of a Module (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True):
        data = data.data if isinstance(data, Tensor) else data
        # An array (such as creation.empty_parameter_data's, made for a device) keeps its device.
        Tensor.__init__(self, data, requires_grad=requires_grad, device=backend.device_of(data) if backend.is_array(data) else None)

    def __repr__(self):
        return "Parameter containing:\n" + Tensor.__repr__(self)


class Module:
    """Base class of layers and models: subclasses assign parts in __init__ and define forward()."""

    # (kind, hook) pairs, "pre" or "post", in the order registered: a class default, so that calling a
    # module without hooks costs one test of an empty tuple.
    _forward_hooks = ()

    def __init__(self):
        self.training = True

    def __call__(self, *args, **kwargs):
        if self._forward_hooks:
            return self._call_with_hooks(args, kwargs)
        return self.forward(*args, **kwargs)

    def _call_with_hooks(self, args, kwargs):
        hooks = tuple(self._forward_hooks)  # a hook that removes itself must not upset this call
        for kind, hook in hooks:
            if kind == "pre":
                changed = hook(self, args)
                if changed is not None:
                    args = changed if isinstance(changed, tuple) else (changed,)
        output = self.forward(*args, **kwargs)
        for kind, hook in hooks:
            if kind == "post":
                changed = hook(self, args, output)
                if changed is not None:
                    output = changed
        return output

    def register_forward_pre_hook(self, hook):
        """Call `hook(module, args)` before every forward; it may return replacement args (a tuple,
        or one value). As in PyTorch; returns a handle whose remove() detaches the hook."""
        return self._add_forward_hook("pre", hook)

    def register_forward_hook(self, hook):
        """Call `hook(module, args, output)` after every forward; it may return a replacement output.
        As in PyTorch; returns a handle whose remove() detaches the hook."""
        return self._add_forward_hook("post", hook)

    def _add_forward_hook(self, kind, hook):
        if not callable(hook):
            raise TypeError(f"a forward hook must be callable, got {type(hook).__name__}")
        if "_forward_hooks" not in vars(self):
            self._forward_hooks = []
        return backend.HookHandle(self._forward_hooks, (kind, hook))

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def _children(self):
        """(name, value) of every Parameter, buffer Tensor and Module attribute, in assignment order."""
        return [(name, value) for name, value in vars(self).items() if isinstance(value, (Tensor, Module))]

    def named_modules(self, prefix="", _seen=None):
        """(dotted name, Module) for this module and every submodule; a shared one is listed once."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, value in self._children():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        return [module for _, module in self.named_modules()]

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs; a Parameter shared by two modules is listed once."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, value in module._children():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def train(self, mode=True):
        for module in self.modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter, its gradient and every buffer to `device`, in place."""
        device = backend.check_device(device)
        for module in self.modules():
            for _, value in module._children():
                if isinstance(value, Tensor):
                    value.data = backend.to_device(value.data, device)
                    if value.grad is not None:
                        value.grad.data = backend.to_device(value.grad.data, device)
        return self

    def state_dict(self):
        """Parameter name -> backend array (the live arrays, as PyTorch returns live tensors)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters, in place, on their device and dtype.

        Shape mismatches are always an error; with strict=True, so are missing and
        unexpected keys. The message names every offending key.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        mismatched = [f"{name}: checkpoint {tuple(state[name].shape)} vs model {params[name].shape}"
                      for name in params if name in state and tuple(state[name].shape) != params[name].shape]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append("shape mismatch " + "; ".join(mismatched))
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        for name, p in params.items():
            if name in state:
                value = state[name].data if isinstance(state[name], Tensor) else state[name]
                p.data[...] = backend.as_array(value, dtype=p.dtype, device=p.device)
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = [(name, value) for name, value in self._children() if isinstance(value, Module)]
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)


class ModuleList(Module):
    """A list of modules whose parameters the parent module sees."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__} holds Modules, got {type(module).__name__}")
        setattr(self, str(len(self)), module)
        return self

    def __iter__(self):
        return iter(value for _, value in self._children())

    def __len__(self):
        return len(self._children())

    def __getitem__(self, index):
        return list(self)[index]


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for module in self:
            x = module(x)
        return x
