"""Modules, layers and initialisers: values against NumPy written out by hand, gradients by gradcheck."""
import math

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import nn
from tinyattn.nn import init

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)
cpu_only = pytest.mark.parametrize("device", ["cpu"], indirect=True)  # overrides the module's two devices


def rng_array(*shape, seed=0):
    return np.random.default_rng(1000 + seed).standard_normal(shape)


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def x64(*shape, seed=0, requires_grad=True):
    return on_device(rng_array(*shape, seed=seed), requires_grad=requires_grad)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4, generator=ta.Generator(0))
        self.scale = nn.Parameter(ta.ones(4))
        self.norm = nn.LayerNorm(4)
        self.drop = nn.Dropout(0.5, generator=ta.Generator(0))

    def forward(self, x):
        return self.drop(self.norm(self.first(x) * self.scale))


def mlp(seed):
    return nn.Sequential(nn.Linear(3, 5, generator=ta.Generator(seed)), nn.ReLU(),
                         nn.Linear(5, 2, generator=ta.Generator(seed + 100)))


# --- Module ------------------------------------------------------------------------------

def test_parameters_and_submodules_registered_in_assignment_order():
    block = Block()
    # As in PyTorch: a module's own parameters first, then each submodule's, all in assignment order.
    names = [name for name, _ in block.named_parameters()]
    assert names == ["scale", "first.weight", "first.bias", "norm.weight", "norm.bias"]
    params = block.parameters()
    assert params[0] is block.scale and params[1] is block.first.weight and params[2] is block.first.bias
    assert params[3] is block.norm.weight and params[4] is block.norm.bias

    class TwoParams(nn.Module):
        def __init__(self):
            super().__init__()
            self.zeta = nn.Parameter(np.zeros(1))
            self.alpha = nn.Parameter(np.zeros(2))
            self.mid = nn.Linear(1, 1)
            self.beta = nn.Parameter(np.zeros(3))
            self.aaa = nn.Linear(2, 1)

    assert [name for name, _ in TwoParams().named_parameters()] == [
        "zeta", "alpha", "beta", "mid.weight", "mid.bias", "aaa.weight", "aaa.bias"]
    assert [type(m).__name__ for m in block.modules()] == ["Block", "Linear", "LayerNorm", "Dropout"]
    assert [name for name, _ in block.named_modules()] == ["", "first", "norm", "drop"]


def test_sequential_dotted_names():
    model = mlp(0)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert model.parameters()[0] is model[0].weight
    assert model.parameters()[3] is model[2].bias
    assert len(model) == 3
    assert model.num_parameters() == 5 * 3 + 5 + 2 * 5 + 2


def test_nested_dotted_names():
    outer = nn.Sequential(mlp(0), nn.Linear(2, 1, generator=ta.Generator(0)))
    names = [name for name, _ in outer.named_parameters()]
    assert names == ["0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias", "1.weight", "1.bias"]


def test_shared_parameter_listed_once():
    a = nn.Linear(3, 3, generator=ta.Generator(0))
    b = nn.Linear(3, 3, generator=ta.Generator(1))
    b.weight = a.weight
    model = nn.Sequential(a, b)
    params = model.parameters()
    assert len(params) == 3
    assert sum(p is a.weight for p in params) == 1
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert len(model.state_dict()) == 3


def test_train_eval_propagate_to_children():
    model = nn.Sequential(Block(), nn.Dropout(0.1))
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert len(model.modules()) == 6  # Sequential, Block, Linear, LayerNorm, Dropout, Dropout
    assert not any(m.training for m in model.modules())
    assert not model[0].drop.training
    model.train()
    assert all(m.training for m in model.modules())
    model.train(False)
    assert not any(m.training for m in model.modules())


def test_zero_grad_clears_grads():
    model = mlp(0)
    model(ta.randn(4, 3, generator=ta.Generator(0))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert any(np.abs(p.grad.numpy()).sum() > 0 for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_repr():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    text = repr(model)
    assert "Linear(in_features=3, out_features=2, bias=True)" in text
    assert text.startswith("Sequential(")
    assert "(0): Linear(in_features=3, out_features=2, bias=True)" in text
    assert "(1): ReLU()" in text
    assert text == "Sequential(\n  (0): Linear(in_features=3, out_features=2, bias=True)\n  (1): ReLU()\n)"
    assert repr(nn.Linear(3, 2, bias=False)) == "Linear(in_features=3, out_features=2, bias=False)"


# --- state_dict --------------------------------------------------------------------------

def test_state_dict_round_trip_bit_for_bit():
    a, b = mlp(0), mlp(1)
    x = ta.randn(6, 3, generator=ta.Generator(5))
    assert not np.array_equal(a(x).numpy(), b(x).numpy())
    state = a.state_dict()
    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert state["0.weight"].shape == (5, 3)
    assert b.load_state_dict(state) is b
    np.testing.assert_array_equal(b(x).numpy(), a(x).numpy())
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())
        assert pa.data is not pb.data  # copied, not aliased
    # A later change to A does not leak into B.
    a[0].weight.data[...] += 1.0
    assert not np.array_equal(a(x).numpy(), b(x).numpy())


def test_load_state_dict_missing_key():
    a, b = mlp(0), mlp(1)
    state = dict(a.state_dict())
    del state["2.bias"]
    with pytest.raises(ValueError, match=r"missing.*2\.bias"):
        b.load_state_dict(state)


def test_load_state_dict_unexpected_key():
    a, b = mlp(0), mlp(1)
    state = dict(a.state_dict())
    state["extra.weight"] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"unexpected.*extra\.weight"):
        b.load_state_dict(state)


def test_load_state_dict_shape_mismatch():
    a, b = mlp(0), mlp(1)
    state = dict(a.state_dict())
    state["0.weight"] = np.zeros((5, 4), dtype=np.float32)
    before = b[0].weight.numpy().copy()
    with pytest.raises(ValueError, match=r"shape mismatch.*0\.weight"):
        b.load_state_dict(state)
    with pytest.raises(ValueError, match=r"0\.weight"):
        b.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(b[0].weight.numpy(), before)


def test_load_state_dict_non_strict_tolerates_missing_and_unexpected():
    a, b = mlp(0), mlp(1)
    state = dict(a.state_dict())
    del state["2.bias"]
    state["extra"] = np.zeros(3, dtype=np.float32)
    old_bias = b[2].bias.numpy().copy()
    b.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(b[0].weight.numpy(), a[0].weight.numpy())
    np.testing.assert_array_equal(b[2].weight.numpy(), a[2].weight.numpy())
    np.testing.assert_array_equal(b[2].bias.numpy(), old_bias)
    assert not np.array_equal(old_bias, a[2].bias.numpy())


def test_to_cpu_and_parameter_is_tensor(device):
    model = mlp(0)
    x = ta.randn(2, 3, generator=ta.Generator(1))
    before = model(x).numpy()
    assert model.to("cpu") is model
    assert all(p.device == "cpu" for p in model.parameters())
    np.testing.assert_allclose(model(x.to("cpu")).numpy(), before, rtol=1e-6, atol=1e-7)  # a GPU's BLAS may round apart
    assert model.to(device) is model and all(p.device == device for p in model.parameters())
    np.testing.assert_array_equal(model(x).numpy(), before)
    p = nn.Parameter(np.zeros((2, 3)))
    assert isinstance(p, ta.Tensor)
    assert p.requires_grad and p.is_leaf
    assert p.shape == (2, 3)
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad
    q = nn.Parameter(ta.ones(2))
    assert isinstance(q, nn.Parameter) and q.requires_grad


# --- Linear ------------------------------------------------------------------------------

def test_linear_forward_matches_numpy():
    layer = nn.Linear(4, 3, generator=ta.Generator(0))
    assert layer.weight.shape == (3, 4) and layer.bias.shape == (3,)
    assert layer.weight.dtype == ta.float32
    x = rng_array(5, 4).astype(np.float32)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    expected = x @ w.T + b
    out = layer(on_device(x))
    assert out.shape == (5, 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    x3 = rng_array(2, 5, 4, seed=1).astype(np.float32)
    np.testing.assert_allclose(layer(on_device(x3)).numpy(), x3 @ w.T + b, rtol=1e-5, atol=1e-6)


def test_linear_without_bias():
    layer = nn.Linear(4, 3, bias=False, generator=ta.Generator(0))
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    x = rng_array(5, 4).astype(np.float32)
    np.testing.assert_allclose(layer(on_device(x)).numpy(), x @ layer.weight.numpy().T, rtol=1e-5, atol=1e-6)


def test_linear_init_bound():
    layer = nn.Linear(64, 128, generator=ta.Generator(0))
    bound = 1.0 / math.sqrt(64)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.9 * bound
    assert w.min() < 0 < w.max()


def test_linear_seeds():
    a = nn.Linear(5, 4, generator=ta.Generator(7))
    b = nn.Linear(5, 4, generator=ta.Generator(7))
    c = nn.Linear(5, 4, generator=ta.Generator(8))
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    np.testing.assert_array_equal(a.bias.numpy(), b.bias.numpy())
    assert not np.array_equal(a.weight.numpy(), c.weight.numpy())


def test_linear_wrong_features():
    layer = nn.Linear(4, 3, generator=ta.Generator(0))
    with pytest.raises(ValueError, match="features"):
        layer(ta.zeros(2, 5))


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_linear_gradcheck(shape):
    layer = nn.Linear(4, 3, generator=ta.Generator(0), dtype=ta.float64)
    assert layer.weight.dtype == ta.float64
    x = x64(*shape)
    assert ta.gradcheck(lambda x, *ps: layer(x), [x, *layer.parameters()])


def test_linear_gradient_values():
    layer = nn.Linear(4, 3, generator=ta.Generator(0), dtype=ta.float64)
    x = x64(5, 4)
    g = rng_array(5, 3, seed=3)
    layer(x).backward(g)
    w = layer.weight.numpy()
    np.testing.assert_allclose(x.grad.numpy(), g @ w, rtol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), g.T @ x.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), g.sum(axis=0), rtol=1e-12)


# --- Embedding ---------------------------------------------------------------------------

def test_embedding_lookup():
    emb = nn.Embedding(10, 4, generator=ta.Generator(0))
    assert emb.weight.shape == (10, 4)
    ids = np.array([[1, 5, 1], [9, 0, 3]])
    out = emb(on_device(ids))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.numpy(), emb.weight.numpy()[ids])
    np.testing.assert_array_equal(out.numpy()[0, 1], emb.weight.numpy()[5])


@cpu_only  # ids are range-checked on the host only: on a GPU the check would sync every lookup (ops.check_ids_in_range)
@pytest.mark.parametrize("bad", [-1, -3, 12, 17])
def test_embedding_out_of_range(bad):
    emb = nn.Embedding(10, 4, generator=ta.Generator(0))
    with pytest.raises(IndexError, match=rf"(?<![0-9-]){bad}(?![0-9])"):
        emb(ta.tensor([0, bad, 2]))


def test_embedding_float_ids():
    emb = nn.Embedding(10, 4, generator=ta.Generator(0))
    with pytest.raises(TypeError):
        emb(ta.tensor([1.0, 2.0]))


def test_embedding_repeated_ids_accumulate():
    emb = nn.Embedding(5, 3, generator=ta.Generator(0), dtype=ta.float64)
    ids = np.array([2, 0, 2, 2, 4])
    g = rng_array(5, 3, seed=2)
    emb(on_device(ids)).backward(g)
    expected = np.zeros((5, 3))
    expected[2] = g[0] + g[2] + g[3]
    expected[0] = g[1]
    expected[4] = g[4]
    np.testing.assert_allclose(emb.weight.grad.numpy(), expected, rtol=1e-12, atol=0)


def test_embedding_gradcheck():
    emb = nn.Embedding(5, 3, generator=ta.Generator(0), dtype=ta.float64)
    ids = ta.tensor([[1, 1, 4], [0, 1, 3]])
    assert ta.gradcheck(lambda ids, w: emb(ids), [ids, emb.weight])


# --- LayerNorm ---------------------------------------------------------------------------

def test_layer_norm_matches_numpy():
    ln = nn.LayerNorm(6, eps=1e-5, dtype=ta.float64)
    np.testing.assert_array_equal(ln.weight.numpy(), np.ones(6))
    np.testing.assert_array_equal(ln.bias.numpy(), np.zeros(6))
    ln.load_state_dict({"weight": rng_array(6, seed=1), "bias": rng_array(6, seed=2)})
    x = rng_array(2, 3, 6, seed=3) * 3 + 1
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * ln.weight.numpy() + ln.bias.numpy()
    out = ln(on_device(x))
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_layer_norm_eps_used():
    ln = nn.LayerNorm(4, eps=1.0, dtype=ta.float64)
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    var = x.var(axis=-1, keepdims=True)  # 1.25
    expected = (x - 2.5) / np.sqrt(var + 1.0)
    np.testing.assert_allclose(ln(on_device(x)).numpy(), expected, rtol=1e-12)


def test_layer_norm_wrong_last_dim():
    ln = nn.LayerNorm(6)
    with pytest.raises(ValueError, match="6"):
        ln(ta.zeros(2, 5))


def test_layer_norm_gradcheck():
    ln = nn.LayerNorm(4, dtype=ta.float64)
    ln.load_state_dict({"weight": rng_array(4, seed=1), "bias": rng_array(4, seed=2)})
    x = x64(2, 3, 4, seed=3)
    assert ta.gradcheck(lambda x, *ps: ln(x), [x, *ln.parameters()])


# --- Dropout -----------------------------------------------------------------------------

def test_dropout_eval_is_identity():
    drop = nn.Dropout(0.5, generator=ta.Generator(0))
    drop.eval()
    x = ta.randn(50, 20, generator=ta.Generator(1))
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())


def test_dropout_train_statistics_and_scale():
    drop = nn.Dropout(0.5, generator=ta.Generator(0))
    assert drop.training
    x = on_device(np.linspace(1.0, 2.0, 10_000).reshape(100, 100))
    out = drop(x).numpy()
    zero = out == 0
    assert 0.45 <= zero.mean() <= 0.55
    np.testing.assert_allclose(out[~zero], 2.0 * x.numpy()[~zero], rtol=1e-15)


def test_dropout_gradient_uses_mask():
    drop = nn.Dropout(0.25, generator=ta.Generator(3))
    x = on_device(np.ones((40, 40)), requires_grad=True)
    out = drop(x)
    out.sum().backward()
    kept = out.numpy() != 0
    np.testing.assert_allclose(x.grad.numpy(), kept / 0.75, rtol=1e-15)


def test_dropout_seeded_mask():
    x = ta.ones(30, 30)
    a = nn.Dropout(0.5, generator=ta.Generator(4))(x).numpy()
    b = nn.Dropout(0.5, generator=ta.Generator(4))(x).numpy()
    c = nn.Dropout(0.5, generator=ta.Generator(5))(x).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_bad_p(p):
    with pytest.raises(ValueError):
        nn.Dropout(p)


# --- activations and Sequential ----------------------------------------------------------

def test_relu_module():
    x = rng_array(4, 5)
    out = nn.ReLU()(on_device(x)).numpy()
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(out, ta.relu(on_device(x)).numpy())


def test_gelu_module():
    x = rng_array(4, 5) * 3
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    out = nn.GELU()(on_device(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(out, ta.gelu(on_device(x)).numpy())


def test_sequential_applies_in_order():
    model = mlp(3)
    x = rng_array(4, 3).astype(np.float32)
    w0, b0 = model[0].weight.numpy(), model[0].bias.numpy()
    w2, b2 = model[2].weight.numpy(), model[2].bias.numpy()
    expected = np.maximum(x @ w0.T + b0, 0) @ w2.T + b2
    np.testing.assert_allclose(model(on_device(x)).numpy(), expected, rtol=1e-5, atol=1e-6)

    class AddOne(nn.Module):
        def forward(self, x):
            return x + 1.0

    class Double(nn.Module):
        def forward(self, x):
            return x * 2.0

    t = on_device(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(nn.Sequential(AddOne(), Double())(t).numpy(), [4.0, 6.0])
    np.testing.assert_array_equal(nn.Sequential(Double(), AddOne())(t).numpy(), [3.0, 5.0])


def test_sequential_gradcheck():
    model = nn.Sequential(nn.Linear(3, 4, generator=ta.Generator(0), dtype=ta.float64), nn.GELU(),
                          nn.LayerNorm(4, dtype=ta.float64), nn.Linear(4, 2, generator=ta.Generator(1), dtype=ta.float64))
    x = x64(2, 3)
    assert ta.gradcheck(lambda x, *ps: model(x), [x, *model.parameters()])


# --- nn.init -----------------------------------------------------------------------------

def test_xavier_uniform_bound():
    t = ta.zeros(200, 300, dtype=ta.float64)
    assert init.xavier_uniform_(t, generator=ta.Generator(0)) is t
    bound = math.sqrt(6.0 / (300 + 200))
    a = np.abs(t.numpy())
    assert a.max() <= bound
    assert a.max() > 0.9 * bound
    # a uniform in (-b, b) has std b/sqrt(3)
    assert abs(t.numpy().std() - bound / math.sqrt(3)) < 0.02 * bound


def test_xavier_uniform_gain_and_fans():
    t = ta.zeros(100, 50, dtype=ta.float64)
    init.xavier_uniform_(t, gain=2.0, generator=ta.Generator(0))
    bound = 2.0 * math.sqrt(6.0 / 150)
    assert bound * 0.9 < np.abs(t.numpy()).max() <= bound
    with pytest.raises(ValueError):
        init.xavier_uniform_(ta.zeros(5))


def test_normal_init_statistics():
    t = ta.zeros(200, 200, dtype=ta.float64)
    init.normal_(t, mean=1.5, std=0.2, generator=ta.Generator(0))
    values = t.numpy()
    assert abs(values.mean() - 1.5) < 0.01
    assert abs(values.std() - 0.2) < 0.01


def test_zeros_and_ones_init():
    t = ta.randn(4, 5, generator=ta.Generator(0))
    assert init.zeros_(t) is t
    np.testing.assert_array_equal(t.numpy(), np.zeros((4, 5)))
    init.ones_(t)
    np.testing.assert_array_equal(t.numpy(), np.ones((4, 5)))


def test_init_reproducible_with_seed():
    for fill in (lambda t, g: init.xavier_uniform_(t, generator=g), lambda t, g: init.normal_(t, generator=g),
                 lambda t, g: init.uniform_(t, -1.0, 1.0, generator=g)):
        a, b, c = ta.zeros(8, 6), ta.zeros(8, 6), ta.zeros(8, 6)
        fill(a, ta.Generator(11))
        fill(b, ta.Generator(11))
        fill(c, ta.Generator(12))
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert not np.array_equal(a.numpy(), c.numpy())
        assert np.abs(a.numpy()).sum() > 0


def test_shared_submodule_listed_once_and_state_dict_accepts_tensors():
    shared = nn.Linear(2, 2, generator=ta.Generator(0))
    model = nn.Sequential(shared, shared)
    assert len(model.modules()) == 2 and len(model.parameters()) == 2
    other = nn.Linear(2, 2, generator=ta.Generator(1))
    other.load_state_dict({k: ta.tensor(v) for k, v in shared.state_dict().items()})
    np.testing.assert_array_equal(other.weight.numpy(), shared.weight.numpy())
