"""Reverse-mode automatic differentiation: Tensor, Function, and the backward walk.

A Tensor holds an array (`data`) and, when it was computed by an op while gradients
were being recorded, the Function that made it (`_ctx`). Functions hold their input
Tensors, so the results of a computation form a graph that leads back to its leaves.
`backward()` walks that graph once in reverse topological order, asking each Function
for the gradients of its inputs given the gradient of its output.

Backward rules are themselves written with Tensor ops. Normally they run with
recording switched off, so they cost little; with `create_graph=True` they are
recorded like any other computation, and gradients of gradients come for free.
"""
import functools
import threading
import weakref

from . import backend

# tinyattn.ops, which Tensor's methods call. ops.py builds on this module (Function, Tensor),
# so this module cannot import it; ops.py binds this name when it has loaded.
ops = None

class _ThreadGradMode(threading.local):
    enabled = True  # each thread starts recording (a class default: no failed lookup on every op)


_grad_mode = _ThreadGradMode()
_op_hooks = []  # see add_op_hook


def add_op_hook(hook):
    """Run `hook(phase, name, run)` around every Function's forward (phase 'forward') and
    backward ('backward'): `name` is the Function's class name and `run()` does the work,
    whose result the hook returns. The profiler times ops this way. Returns a handle whose
    remove() detaches the hook."""
    return backend.HookHandle(_op_hooks, hook)


def _hooked(phase, name, run):
    for hook in reversed(_op_hooks):
        run = functools.partial(hook, phase, name, run)
    return run()


def is_grad_enabled():
    return _grad_mode.enabled


class _GradMode:
    """Switches gradient recording for the current thread, as a context manager or a decorator."""

    enabled = True

    def __enter__(self):
        stack = _grad_mode.__dict__.setdefault("saved", [])
        stack.append(is_grad_enabled())
        _grad_mode.enabled = self.enabled

    def __exit__(self, *exc_info):
        _grad_mode.enabled = _grad_mode.saved.pop()

    def __call__(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(self.enabled):
                return function(*args, **kwargs)
        return wrapper


class no_grad(_GradMode):
    """Inside it, ops record no graph and keep no arrays alive for backward."""

    enabled = False


class enable_grad(_GradMode):
    """Turns recording back on inside a `no_grad` region."""

    enabled = True


class set_grad_enabled(_GradMode):
    def __init__(self, mode):
        self.enabled = bool(mode)


class Function:
    """One differentiable operation: `forward` on arrays, `backward` on Tensors.

    Subclasses write `forward(self, *arrays, **options)` and `backward(self, *grads)`.
    forward returns one array, or a tuple of arrays for an op with several outputs
    (attention returns its output and its weights); apply then returns a Tensor for
    each. backward gets one gradient per output (None for an output no gradient reached)
    and returns one gradient (or None) per input. An input may be None, an absent
    optional parameter such as a bias: forward sees None and backward returns None for it.
    State that backward needs is saved on `self` in forward; `self.inputs` are the input
    Tensors and `self.output` (`self.outputs`) the results, for rules cheaper in terms of them.
    """

    inputs = None  # None after the graph was released by a backward pass
    n_outputs = 1

    @classmethod
    def apply(cls, *inputs, **options):
        arrays = [None if tensor is None else tensor.data for tensor in inputs]
        kind = type(arrays[0])
        for array in arrays[1:]:
            if array is not None and type(array) is not kind:
                devices = " and ".join(sorted({backend.device_of(a) for a in arrays if a is not None}))
                raise backend.DeviceError(f"{cls.__name__} got tensors on different devices ({devices}); move them with .to(device) first")
        function = cls()
        function.xp = backend.array_module(arrays[0])
        try:
            if _op_hooks:
                results = _hooked("forward", cls.__name__, functools.partial(function.forward, *arrays, **options))
            else:
                results = function.forward(*arrays, **options)
        except (ValueError, IndexError) as error:
            shapes = " and ".join(str(a.shape) for a in arrays if a is not None)
            raise type(error)(f"{cls.__name__} on shapes {shapes}: {error}") from None
        several = type(results) is tuple
        needs_input_grad = tuple(t is not None and t.requires_grad for t in inputs) if _grad_mode.enabled else ()
        record = True in needs_input_grad
        outputs, recorded = [], False
        for index, result in enumerate(results if several else (results,)):
            if type(result) is not kind:  # NumPy hands back scalars, not 0-d arrays, from full reductions
                result = backend.ensure_array(result)
            requires_grad = record and backend.is_floating(result.dtype)
            output = Tensor._from_array(result, requires_grad)
            if requires_grad:
                output._ctx, output._output_index, recorded = function, index, True
            outputs.append(output)
        if recorded:
            function.inputs = inputs
            function.needs_input_grad = needs_input_grad
            function.n_outputs = len(outputs)
            function._outputs = tuple(weakref.ref(output) for output in outputs)
        return tuple(outputs) if several else outputs[0]

    @property
    def output(self):
        return self._outputs[0]()

    @property
    def outputs(self):
        return tuple(output() for output in self._outputs)

    def forward(self, *arrays, **options):
        raise NotImplementedError

    def backward(self, *grads):
        raise NotImplementedError

    def release(self):
        """Drop inputs and saved arrays once this Function's gradients are computed."""
        self.__dict__.clear()


class Tensor:
    """An n-dimensional array that remembers how it was computed."""

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_output_index", "_retains_grad", "__weakref__")
    __array_ufunc__ = None  # numpy_scalar * tensor must call Tensor.__rmul__, not numpy

    def __init__(self, data, dtype=None, requires_grad=False, device=None):
        self.data = backend.as_array(data, dtype, device)
        self.grad = None
        self._ctx = None
        self._output_index = 0
        self._retains_grad = False
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_()

    @classmethod
    def _from_array(cls, array, requires_grad=False):
        tensor = cls.__new__(cls)
        tensor.data = array
        tensor.grad = None
        tensor.requires_grad = requires_grad
        tensor._ctx = None
        tensor._output_index = 0  # which of its Function's outputs this tensor is
        tensor._retains_grad = False
        return tensor

    # --- what a tensor is ---------------------------------------------------------

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)
    grad_fn = property(lambda self: self._ctx)
    xp = property(lambda self: backend.array_module(self.data))  # numpy or cupy, whichever holds the data

    def __len__(self):
        return self.data.shape[0]

    def __repr__(self):
        body = repr(backend.to_host(self.data)).replace("array(", "tensor(", 1)
        extras = []
        if self.device != "cpu":
            extras.append(f"device='{self.device}'")
        if self._ctx is not None:
            extras.append(f"grad_fn={type(self._ctx).__name__}")
        elif self.requires_grad:
            extras.append("requires_grad=True")
        return body if not extras else body[:-1] + ", " + ", ".join(extras) + ")"

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous; use .any() or .all()")
        return bool(self.data)


    def numpy(self):
        """The values as a host numpy array (a copy for GPU tensors)."""
        return backend.to_host(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        """The same data, cut off from the graph."""
        return Tensor._from_array(self.data)

    def requires_grad_(self, requires_grad=True):
        if requires_grad and not backend.is_floating(self.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        self.requires_grad = requires_grad
        return self

    def retain_grad(self):
        """Keep the gradient of this non-leaf tensor in `.grad` after backward."""
        if not self.requires_grad:
            raise RuntimeError("retain_grad() on a tensor that does not require grad")
        self._retains_grad = True
        return self

    # --- ops as methods: each calls the function of the same name in ops.py -------------

    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __pow__(self, other):
        return ops.pow(self, other)

    def __rpow__(self, other):
        return ops.pow(other, self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        return ops.matmul(other, self)

    def __neg__(self):
        return ops.neg(self)

    def __abs__(self):
        return ops.abs(self)

    def __getitem__(self, index):
        return ops.getitem(self, index)

    # Comparisons are elementwise and give boolean tensors outside the graph.
    def __eq__(self, other):
        return ops.equal(self, other)

    def __ne__(self, other):
        return ops.not_equal(self, other)

    def __lt__(self, other):
        return ops.less(self, other)

    def __le__(self, other):
        return ops.less_equal(self, other)

    def __gt__(self, other):
        return ops.greater(self, other)

    def __ge__(self, other):
        return ops.greater_equal(self, other)

    __hash__ = object.__hash__  # == is elementwise, so hash by identity as PyTorch does

    @property
    def T(self):
        """The axes reversed."""
        return ops.transpose(self)

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def sqrt(self):
        return ops.sqrt(self)

    def tanh(self):
        return ops.tanh(self)

    def sigmoid(self):
        return ops.sigmoid(self)

    def relu(self):
        return ops.relu(self)

    def gelu(self):
        return ops.gelu(self)

    def abs(self):
        return ops.abs(self)

    def clip(self, low=None, high=None):
        return ops.clip(self, low, high)

    def maximum(self, other):
        return ops.maximum(self, other)

    def minimum(self, other):
        return ops.minimum(self, other)

    def sum(self, axis=None, keepdims=False):
        return ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return ops.mean(self, axis, keepdims)

    def var(self, axis=None, keepdims=False, ddof=0):
        return ops.var(self, axis, keepdims, ddof)

    def max(self, axis=None, keepdims=False):
        return ops.max(self, axis, keepdims)

    def min(self, axis=None, keepdims=False):
        return ops.min(self, axis, keepdims)

    def argmax(self, axis=None, keepdims=False):
        return ops.argmax(self, axis, keepdims)

    def argmin(self, axis=None, keepdims=False):
        return ops.argmin(self, axis, keepdims)

    def reshape(self, *shape):
        return ops.reshape(self, *shape)

    def transpose(self, *axes):
        return ops.transpose(self, *axes)

    def swapaxes(self, axis1, axis2):
        return ops.swapaxes(self, axis1, axis2)

    def squeeze(self, axis=None):
        return ops.squeeze(self, axis)

    def unsqueeze(self, axis):
        return ops.unsqueeze(self, axis)

    def broadcast_to(self, shape):
        return ops.broadcast_to(self, shape)

    def expand(self, *shape):
        return ops.expand(self, *shape)

    def sum_to(self, shape):
        return ops.sum_to(self, shape)

    def masked_fill(self, mask, value):
        return ops.masked_fill(self, mask, value)

    def split(self, indices_or_sections, axis=0):
        return ops.split(self, indices_or_sections, axis)

    def astype(self, dtype):
        return ops.astype(self, dtype)

    def to(self, device):
        return ops.to(self, device)

    # --- backward -----------------------------------------------------------------

    def backward(self, grad=None, retain_graph=False, create_graph=False):
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf that requires grad.

        `grad` is the gradient of some scalar with respect to this tensor; it may be
        left out only when this tensor has one element.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input had requires_grad=True, or it was computed under no_grad)")
        grad = _initial_grad(self, grad)
        backpropagate(self, grad, retain_graph or create_graph, create_graph)


def _initial_grad(output, grad):
    if grad is None:
        if output.data.size != 1:
            raise RuntimeError(f"backward() without a grad argument needs a tensor with one element, got shape {output.shape}; pass grad= of that shape")
        return Tensor._from_array(output.xp.ones_like(output.data))
    grad = grad if isinstance(grad, Tensor) else Tensor(grad, dtype=output.dtype, device=output.device)
    if grad.shape != output.shape:
        raise ValueError(f"backward() got grad of shape {grad.shape} for a tensor of shape {output.shape}")
    if grad.device != output.device:
        raise backend.DeviceError(f"backward() got grad on {grad.device} for a tensor on {output.device}; move it with .to(device) first")
    return grad


def _topological_order(root):
    """Functions reachable from `root`, each after every Function that consumes its output.

    An explicit stack instead of recursion, so a graph 100,000 ops deep is no problem.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        function, inputs_done = stack.pop()
        if inputs_done:
            order.append(function)
            continue
        if function in visited:
            continue
        if function.inputs is None:
            raise RuntimeError(
                "backward through a graph whose saved arrays were already released by an earlier backward(); "
                "pass retain_graph=True to the first backward() if you need to go through it twice")
        visited.add(function)
        stack.append((function, True))
        for tensor in function.inputs:
            if tensor is not None and tensor._ctx is not None and tensor._ctx not in visited:
                stack.append((tensor._ctx, False))
    order.reverse()
    return order


def _reduce_to_input(grad, tensor):
    """The one place where a gradient is summed back to its input's broadcast shape and dtype."""
    if grad.shape != tensor.shape:
        grad = grad.sum_to(tensor.shape)
    if grad.dtype != tensor.dtype:
        grad = grad.astype(tensor.dtype)
    return grad


def backpropagate(root, root_grad, retain_graph, create_graph, inputs=None):
    """Push `root_grad` from `root` to the leaves.

    Without `inputs`, gradients accumulate into `.grad` of leaves (and of tensors that
    called retain_grad). With `inputs`, nothing is written to `.grad`; the gradients of
    those tensors are returned instead, in order (None where one does not depend on root).
    """
    wanted = {id(t): i for i, t in enumerate(inputs)} if inputs is not None else None
    found = [None] * len(inputs) if inputs is not None else None

    def deliver(tensor, grad):
        if wanted is not None:
            index = wanted.get(id(tensor))
            if index is not None:
                found[index] = grad if found[index] is None else found[index] + grad
        elif tensor._ctx is None or tensor._retains_grad:
            if tensor.grad is not None:
                tensor.grad = tensor.grad + grad
            elif create_graph:
                tensor.grad = grad
            else:
                # A fresh, writable array: the same gradient object may reach several leaves
                # (a + b) or be a read-only broadcast view, and optimizers change grads in place.
                tensor.grad = Tensor._from_array(grad.data.copy())

    if root._ctx is None:
        deliver(root, root_grad)
        return found
    # Function -> one entry per output: None, or [that output, the gradient gathered for it
    # so far, whether the engine made that gradient's array itself]. Holding the output keeps
    # it alive for rules that use it, even after its consumers have released their inputs.
    # A gradient the engine summed is seen by no one else, so further contributions are added
    # to it in place; one that came from a backward rule may be shared (Add hands the same
    # gradient to both inputs).
    pending = {}

    def gather(tensor, grad):
        """A gradient reaching a tensor that an op made, from the root or from one of its consumers."""
        slots = pending.get(tensor._ctx)
        if slots is None:
            slots = pending[tensor._ctx] = [None] * tensor._ctx.n_outputs
        slot = slots[tensor._output_index]
        if slot is None:
            slots[tensor._output_index] = [tensor, grad, False]
        elif slot[2]:
            slot[1].data += grad.data
        else:
            slot[1], slot[2] = slot[1] + grad, not create_graph

    gather(root, root_grad)
    with set_grad_enabled(create_graph):
        for function in _topological_order(root._ctx):
            slots = pending.pop(function, None)
            if slots is not None:
                grads = []
                for slot in slots:
                    if slot is not None and (slot[0]._retains_grad or wanted is not None):
                        deliver(slot[0], slot[1])
                    grads.append(None if slot is None else slot[1])
                if _op_hooks:
                    input_grads = _hooked("backward", type(function).__name__, functools.partial(function.backward, *grads))
                else:
                    input_grads = function.backward(*grads)
                if not isinstance(input_grads, tuple):
                    input_grads = (input_grads,)
                for tensor, input_grad in zip(function.inputs, input_grads):
                    if input_grad is None or tensor is None or not tensor.requires_grad:
                        continue
                    input_grad = _reduce_to_input(input_grad, tensor)
                    if tensor._ctx is None:
                        deliver(tensor, input_grad)
                    else:
                        gather(tensor, input_grad)
            if not retain_graph:
                function.release()
    return found


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False):
    """Gradients of `outputs` with respect to `inputs`, returned rather than accumulated.

    Like torch.autograd.grad: nothing is written to any `.grad`. With create_graph the
    results are themselves differentiable.
    """
    single = isinstance(inputs, Tensor)
    inputs = (inputs,) if single else tuple(inputs)
    if not outputs.requires_grad:
        raise RuntimeError("grad(): outputs do not require grad")
    root_grad = _initial_grad(outputs, grad_outputs)
    retain = create_graph if retain_graph is None else retain_graph
    found = backpropagate(outputs, root_grad, retain, create_graph, inputs=inputs)
    for index, value in enumerate(found):
        if value is None and not allow_unused:
            raise RuntimeError(f"grad(): input {index} (shape {inputs[index].shape}) is not used to compute outputs; pass allow_unused=True to get None")
    return found[0] if single else tuple(found)

