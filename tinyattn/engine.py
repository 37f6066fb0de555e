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
import inspect
import itertools
import numbers
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
_tensor_hooks_used = False  # until a first Tensor.register_hook, the backward walk looks for none

# In-place changes (Tensor.__setitem__) are counted. A tensor changed in place keeps the count of its
# last change in `_changed_at` (a slot set only then: a new tensor costs nothing more), and a Function
# the count when it was recorded (`_recorded_at`), so the walk knows which Functions used a tensor
# before it changed, and looks at their inputs only when something changed since they were recorded.
_changes = itertools.count(1)
_last_change = 0


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
        enabled = self.enabled
        if inspect.isgeneratorfunction(function):
            return _generator_in_mode(function, enabled)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(enabled):
                return function(*args, **kwargs)
        return wrapper


class no_grad(_GradMode):
    """Inside it, ops record no graph and keep no arrays alive for backward."""

    enabled = False


class enable_grad(_GradMode):
    """Turns recording back on inside a `no_grad` region."""

    enabled = True


class set_grad_enabled(_GradMode):
    """Chooses the mode from a boolean. As in PyTorch, making it switches the mode at once, so a
    plain call `set_grad_enabled(False)` works too; a `with` block or a decorated function puts the
    previous mode back after it."""

    def __init__(self, mode):
        self.enabled, self.previous = bool(mode), is_grad_enabled()
        _grad_mode.enabled = self.enabled

    def __enter__(self):
        _grad_mode.__dict__.setdefault("saved", []).append(self.previous)
        _grad_mode.enabled = self.enabled

    def __call__(self, function):
        _grad_mode.enabled = self.previous  # decorating is not calling: undo what __init__ switched
        return super().__call__(function)


def _generator_in_mode(function, enabled):
    """A generator function whose body runs in the grad mode `enabled`, while the caller's mode holds
    between its yields (a `with` around the body would leak into the caller at every yield)."""
    @functools.wraps(function)
    def generator(*args, **kwargs):
        body = function(*args, **kwargs)
        resume, argument = body.send, None
        try:
            while True:
                with set_grad_enabled(enabled):
                    produced = resume(argument)
                try:
                    resume, argument = body.send, (yield produced)
                except GeneratorExit:
                    with set_grad_enabled(enabled):
                        body.close()
                    raise
                except BaseException as error:  # thrown in by the caller: the body handles it in its mode
                    resume, argument = body.throw, error
        except StopIteration as stop:
            return stop.value
    return generator


def not_a_tensor(value, where):
    """The TypeError for a value given where a Tensor belongs, naming the place and the type."""
    return TypeError(f"{where} must be a tensor, not {type(value).__name__}; wrap it with ta.tensor(...)")


def expect_tensor(value, where):
    """value, which must be a Tensor (for functions that read its shape or data before any
    Function runs); `where` names it: "mean's input"."""
    if not isinstance(value, Tensor):
        raise not_a_tensor(value, where)
    return value


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
    _recorded_at = 0  # the count of in-place changes when it was recorded (see _last_change)

    @classmethod
    def apply(cls, *inputs, **options):
        try:
            arrays = [None if tensor is None else tensor.data for tensor in inputs]
        except AttributeError:
            raise cls._not_tensors(inputs) from None
        kind = type(arrays[0])
        for array in arrays[1:]:
            if array is not None and type(array) is not kind:
                if not all(tensor is None or isinstance(tensor, Tensor) for tensor in inputs):
                    raise cls._not_tensors(inputs)
                devices = " and ".join(sorted({backend.device_of(a) for a in arrays if a is not None}))
                raise backend.DeviceError(f"{cls.__name__} got tensors on different devices ({devices}); move them with .to(device) first")
        function = cls()
        try:
            function.xp = backend.array_module(arrays[0])
        except TypeError:  # a NumPy array has a .data too: a memoryview
            raise cls._not_tensors(inputs) from None
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
            if _last_change:  # until a first in-place change, the class default 0 is right: no store
                function._recorded_at = _last_change
        return tuple(outputs) if several else outputs[0]

    @classmethod
    def _not_tensors(cls, inputs):
        """The TypeError for inputs that are not all Tensors (or None), naming the first that is not."""
        position, found = next((i, x) for i, x in enumerate(inputs, 1) if x is not None and not isinstance(x, Tensor))
        return not_a_tensor(found, f"{cls.__name__}'s input {position}")

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

    # _changed_at and _hooks are set only by an in-place change and by register_hook, and read with a
    # default, so that making a tensor costs no more for them.
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_output_index", "_retains_grad", "_changed_at", "_hooks",
                 "__weakref__")
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
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        if not self.shape:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self.shape[0]))

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

    def __float__(self):
        return float(self._one_value("float()"))

    def __int__(self):
        return int(self._one_value("int()"))

    def __index__(self):
        """So that a one-element integer tensor can be an index (`x[ta.tensor(1):3]`), as in PyTorch."""
        if self.dtype.kind not in "iub" or self.size != 1:
            raise TypeError(f"only an integer tensor of one element can be used as an index, got dtype {self.dtype} and shape {self.shape}")
        return int(self.data.item())

    def numpy(self):
        """The values as a host numpy array (a copy for GPU tensors)."""
        return backend.to_host(self.data)

    def item(self):
        return self._one_value("item()")

    def _one_value(self, what):
        if self.size != 1:
            raise ValueError(f"{what} needs a tensor with one element, got shape {self.shape}")
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

    def register_hook(self, hook):
        """Call `hook(grad)` when backward has computed this tensor's gradient (for a leaf, the whole
        gradient of that pass, before it is added to `.grad`). A hook may return a replacement of the
        same shape, which later hooks and the rest of the walk get instead. As in PyTorch; returns a
        handle whose remove() detaches the hook."""
        global _tensor_hooks_used
        if not callable(hook):
            raise TypeError(f"register_hook() needs a callable, got {type(hook).__name__}")
        if not self.requires_grad:
            raise RuntimeError("register_hook() on a tensor that does not require grad: no gradient will reach it")
        if getattr(self, "_hooks", None) is None:
            self._hooks = []
        _tensor_hooks_used = True
        return backend.HookHandle(self._hooks, hook)

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

    def __setitem__(self, index, value):
        """`self[index] = value`, as in PyTorch. While recording, when self or value requires grad, it
        is the op SetItem on a copy of the array (ops.setitem), whose result self becomes in the graph;
        the tensor self was stays where the ops that used it before find it (_as_used), so they still
        differentiate the values they saw. Otherwise the array is changed in place, and an op that
        used self before refuses its backward, as there are no old values left to differentiate."""
        global _last_change
        if not (_grad_mode.enabled and (self.requires_grad or getattr(value, "requires_grad", False))):
            ops.setitem(self, index, value, in_place=True)
            _last_change = self._changed_at = next(_changes)
            return
        if self.requires_grad and self._ctx is None:
            raise RuntimeError("a leaf tensor that requires grad cannot be changed in place while gradients are recorded "
                               "(its gradient would belong to values it no longer has); change it under ta.no_grad(), "
                               "as an optimizer does")
        result = ops.setitem(self, index, value)
        was = Tensor._from_array(self.data, self.requires_grad)  # self before the change: its values and history
        was._ctx, was._output_index = self._ctx, self._output_index
        if hasattr(self, "_changed_at"):
            was._changed_at = self._changed_at
        if getattr(self, "_hooks", None):  # PyTorch's rule: hooks registered before see the old value's gradient
            was._hooks, self._hooks = self._hooks, None
        if was._ctx is not None:  # the Function that made self reads its output (exp's rule does) from `was`
            outputs = list(was._ctx._outputs)
            outputs[was._output_index] = weakref.ref(was)
            was._ctx._outputs = tuple(outputs)
        _last_change = self._changed_at = next(_changes)
        self.data, self.requires_grad, self._ctx, self._output_index = result.data, result.requires_grad, result._ctx, 0
        if result._ctx is not None:
            result._ctx.inputs = tuple(was if tensor is self else tensor for tensor in result._ctx.inputs)
            result._ctx._outputs = (weakref.ref(self),)
            result._ctx._recorded_at = self._changed_at  # says the change was recorded: _as_used goes back through it

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

    def std(self, axis=None, keepdims=False, ddof=0):
        return ops.std(self, axis, keepdims, ddof)

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


def _initial_grad(output, grad, argument="backward(): grad"):
    if grad is None:
        if output.data.size != 1:
            raise RuntimeError(f"backward() without a grad argument needs a tensor with one element, got shape {output.shape}; pass grad= of that shape")
        return Tensor._from_array(output.xp.ones_like(output.data))
    if not isinstance(grad, (Tensor, numbers.Number, list, tuple)) and not backend.is_array(grad):
        raise TypeError(f"{argument} must be a Tensor or an array, got {type(grad).__name__}")
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
        if function._recorded_at < _last_change:  # a tensor was changed in place since it ran: one int compare otherwise
            _as_recorded(function)
        for tensor in function.inputs:
            if tensor is not None and tensor._ctx is not None and tensor._ctx not in visited:
                stack.append((tensor._ctx, False))
    order.reverse()
    return order


def _as_recorded(function):
    """Point `function` back at its inputs as they were when it ran (_as_used), and refuse if an
    output that its backward may read was changed in place unrecorded (under no_grad)."""
    function.inputs = tuple(None if tensor is None else _as_used(tensor, function) for tensor in function.inputs)
    for output in function.outputs:
        if output is not None and getattr(output, "_changed_at", 0) > function._recorded_at:
            raise _changed_in_place_error(function)


def _as_used(tensor, function):
    """`tensor` as `function` used it. A recorded change since then made it the output of a SetItem
    whose first input is the tensor it was (Tensor.__setitem__); an unrecorded one left no old values."""
    while getattr(tensor, "_changed_at", 0) > function._recorded_at:
        change = tensor._ctx
        if change is None or change._recorded_at != tensor._changed_at:
            raise _changed_in_place_error(function)
        tensor = change.inputs[0]
    return tensor


def _changed_in_place_error(function):
    return RuntimeError(
        f"a tensor needed for the gradient of {type(function).__name__} was changed in place after it was used; the change "
        "was not recorded (under no_grad, or neither the tensor nor the new values required grad), so its old values "
        "are gone: change it before that use, or change a copy of it")


def _reduce_to_input(grad, tensor):
    """The one place where a gradient is summed back to its input's broadcast shape and dtype."""
    if grad.shape != tensor.shape:
        grad = grad.sum_to(tensor.shape)
    if grad.dtype != tensor.dtype:
        grad = grad.astype(tensor.dtype)
    return grad


def _paths_to(order, wanted):
    """For grad(): the Functions of `order` on a path to a tensor in `wanted` (ids), each with which of
    its inputs lead there. Only their backward runs, so a branch that no input depends on costs
    nothing and cannot refuse (a fused kernel's backward does under create_graph)."""
    leads = {}
    for function in reversed(order):  # each Function after the ones that made its inputs
        mask = tuple(tensor is not None and (id(tensor) in wanted or tensor._ctx in leads) for tensor in function.inputs)
        if True in mask:
            leads[function] = mask
    return leads


def _run_tensor_hooks(tensor, grad):
    for hook in tuple(tensor._hooks):
        replaced = hook(grad)
        if replaced is not None:
            if not isinstance(replaced, Tensor):
                raise TypeError(f"a tensor hook returned {type(replaced).__name__}; it may return a Tensor or None")
            if replaced.shape != grad.shape:
                raise ValueError(f"a tensor hook returned a gradient of shape {replaced.shape} for a tensor of shape {tensor.shape}")
            grad = replaced
    return grad


def backpropagate(root, root_grad, retain_graph, create_graph, inputs=None):
    """Push `root_grad` from `root` to the leaves.

    Without `inputs`, gradients accumulate into `.grad` of leaves (and of tensors that
    called retain_grad). With `inputs`, nothing is written to `.grad`; the gradients of
    those tensors are returned instead, in order (None where one does not depend on root),
    and only the Functions on a path from root to one of them run their backward.
    """
    wanted = {id(t): i for i, t in enumerate(inputs)} if inputs is not None else None
    found = [None] * len(inputs) if inputs is not None else None
    hooked_leaves = {}  # id -> [leaf, its gradient so far]: a leaf's hooks see its whole gradient, once
    handed_out = {id(root_grad.data)}  # ids of the arrays given out so far (the root's gradient is the caller's)

    def own(grad):
        """`grad`, or a copy where its array may be shared or read-only: the same gradient may reach
        several tensors (Add hands it to both inputs), a broadcast view is read-only, and optimizers
        change gradients in place. Under create_graph the copy is an op, so it stays differentiable
        (a Cast to the same dtype: astype always copies)."""
        if grad.data.base is not None or id(grad.data) in handed_out:
            grad = ops.Cast.apply(grad, dtype=grad.dtype) if create_graph else Tensor._from_array(grad.data.copy())
        handed_out.add(id(grad.data))
        return grad

    def deliver(tensor, grad):
        if wanted is not None:
            index = wanted.get(id(tensor))
            if index is not None:
                found[index] = grad if found[index] is None else found[index] + grad
        elif tensor._ctx is None or tensor._retains_grad:
            if tensor.grad is not None:
                tensor.grad = tensor.grad + grad
            elif create_graph:
                tensor.grad = own(grad)
            else:
                tensor.grad = Tensor._from_array(grad.data.copy())  # always a fresh array (see own)

    def reach_hooked_leaf(tensor, grad):
        entry = hooked_leaves.setdefault(id(tensor), [tensor, None])
        entry[1] = grad if entry[1] is None else entry[1] + grad

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

    with set_grad_enabled(create_graph):
        if root._ctx is None:
            (reach_hooked_leaf if _tensor_hooks_used and getattr(root, "_hooks", None) else deliver)(root, root_grad)
        else:
            gather(root, root_grad)
            order = _topological_order(root._ctx)
            leads = _paths_to(order, wanted) if wanted is not None else None
            for function in order:
                slots = pending.pop(function, None)
                if slots is not None:
                    grads = []
                    for slot in slots:
                        if slot is not None:
                            if _tensor_hooks_used and getattr(slot[0], "_hooks", None):
                                slot[1] = _run_tensor_hooks(slot[0], slot[1])
                            if slot[0]._retains_grad or wanted is not None:
                                deliver(slot[0], slot[1])
                        grads.append(None if slot is None else slot[1])
                    needed = leads.get(function) if leads is not None else function.needs_input_grad
                    if needed is not None:
                        if _op_hooks:
                            input_grads = _hooked("backward", type(function).__name__, functools.partial(function.backward, *grads))
                        else:
                            input_grads = function.backward(*grads)
                        if not isinstance(input_grads, tuple):
                            input_grads = (input_grads,)
                        for tensor, input_grad, need in zip(function.inputs, input_grads, needed):
                            if input_grad is None or not need or not tensor.requires_grad:
                                continue
                            input_grad = _reduce_to_input(input_grad, tensor)
                            if tensor._ctx is not None:
                                gather(tensor, input_grad)
                            elif _tensor_hooks_used and getattr(tensor, "_hooks", None):
                                reach_hooked_leaf(tensor, input_grad)
                            else:
                                deliver(tensor, input_grad)
                if not retain_graph and (leads is None or function in leads):
                    function.release()
        for tensor, grad in hooked_leaves.values():
            deliver(tensor, _run_tensor_hooks(tensor, grad))
        if found is not None:
            found = [None if grad is None else own(grad) for grad in found]
    return found


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False):
    """Gradients of `outputs` with respect to `inputs`, returned rather than accumulated.

    Like torch.autograd.grad: nothing is written to any `.grad`, and only the ops on a path
    from outputs to inputs are differentiated. With create_graph the results are themselves
    differentiable. Each result is an array of its own, writable.
    """
    if not isinstance(outputs, Tensor):
        several = " (for several outputs, differentiate their sum)" if isinstance(outputs, (list, tuple)) else ""
        raise TypeError(f"grad(): outputs must be a Tensor, got {type(outputs).__name__}{several}")
    single = isinstance(inputs, Tensor)
    if single:
        inputs = (inputs,)
    elif isinstance(inputs, (str, bytes)) or not hasattr(inputs, "__iter__"):
        raise TypeError(f"grad(): inputs must be a Tensor or a sequence of Tensors, got {type(inputs).__name__}")
    inputs = tuple(inputs)
    if not inputs:
        raise ValueError("grad(): inputs is empty; pass the tensors to differentiate with respect to")
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"grad(): inputs[{index}] must be a Tensor, got {type(tensor).__name__}")
        if not tensor.requires_grad:
            raise RuntimeError(f"grad(): inputs[{index}] does not require grad (shape {tensor.shape}), so it has no gradient")
    if not outputs.requires_grad:
        raise RuntimeError("grad(): outputs do not require grad")
    root_grad = _initial_grad(outputs, grad_outputs, "grad(): grad_outputs")
    retain = create_graph if retain_graph is None else retain_graph
    found = backpropagate(outputs, root_grad, retain, create_graph, inputs=inputs)
    for index, value in enumerate(found):
        if value is None and not allow_unused:
            raise RuntimeError(f"grad(): input {index} (shape {inputs[index].shape}) is not used to compute outputs; pass allow_unused=True to get None")
    return found[0] if single else tuple(found)
