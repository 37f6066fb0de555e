"""Issue 14's edges in the optimizers, clipping, LayerNorm, random dtypes and attention masks,
against PyTorch in float64 where it is installed (those tests skip where it is not)."""
import math

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import backend, kernels, nn, optim
from tinyattn import functional as F

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

RNG = np.random.default_rng(14)


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets."""
    return ta.tensor(np.asarray(array), device=ta.get_default_device(), **options)


def with_grads(arrays, grads):
    """Float64 leaves holding `arrays`, each with its gradient set to the matching `grads` entry."""
    params = [on_device(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    for param, grad in zip(params, grads):
        param.grad = on_device(np.array(grad, dtype=np.float64))
    return params


def torch_with_grads(torch, arrays, grads):
    params = [torch.tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    for param, grad in zip(params, grads):
        param.grad = torch.tensor(np.array(grad, dtype=np.float64))
    return params


SHAPES = [(2, 3), (4,), (1, 1, 2)]


def random_grads(scale=1.0):
    return [RNG.standard_normal(shape) * scale for shape in SHAPES]


# --- clip_grad_norm_ -------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2, 2.0, math.inf, "inf", 1, 3, 0.5])
def test_clip_grad_norm_matches_torch_for_each_norm_type(norm_type):
    torch = pytest.importorskip("torch")
    values, grads = random_grads(), random_grads(3.0)
    ours, theirs = with_grads(values, grads), torch_with_grads(torch, values, grads)
    norm = optim.clip_grad_norm_(ours, 1.5, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.5, norm_type=float(norm_type))
    assert norm.shape == () and norm.dtype == np.float64
    assert norm.item() == pytest.approx(expected.item(), rel=1e-12)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm_type", [0, -1, float("nan")])
def test_clip_grad_norm_refuses_a_norm_type_that_is_not_positive(norm_type):
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        optim.clip_grad_norm_(with_grads(SHAPES[:1], [np.ones(SHAPES[0])]), 1.0, norm_type=norm_type)


def test_clip_grad_norm_takes_a_single_tensor_as_torch_does():
    torch = pytest.importorskip("torch")
    grad = RNG.standard_normal((3, 4)) * 5
    (ours,), (theirs,) = with_grads([np.zeros((3, 4))], [grad]), torch_with_grads(torch, [np.zeros((3, 4))], [grad])
    norm = optim.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-12)
    assert np.linalg.norm(ours.grad.numpy()) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_takes_a_generator_of_tensors():
    params = with_grads([np.zeros(2), np.zeros(1)], [[3.0, 4.0], [12.0]])
    assert optim.clip_grad_norm_((p for p in params), 1.3).item() == pytest.approx(13.0, rel=1e-15)
    np.testing.assert_allclose(np.concatenate([p.grad.numpy() for p in params]), [0.3, 0.4, 1.2], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_clip_grad_norm_after_create_graph_scales_read_only_graph_and_shared_gradients():
    torch = pytest.importorskip("torch")
    values = [RNG.standard_normal(3), RNG.standard_normal((2, 2)), RNG.standard_normal(2), RNG.standard_normal(2)]

    def loss(x, y, a, b, sum_all):
        # x's gradient is part of a graph (3x^2); y's is a broadcast of the sum's seed (read-only
        # in the engine); a and b are added, so the engine may hand both the same gradient.
        return sum_all(x * x * x) + sum_all(y) * 3.0 + sum_all(a + b)

    ours = [on_device(v, requires_grad=True) for v in values]
    loss(*ours, lambda t: t.sum()).backward(create_graph=True)
    theirs = [torch.tensor(v, requires_grad=True) for v in values]
    loss(*theirs, torch.sum).backward(create_graph=True)
    norm = optim.clip_grad_norm_(ours, 2.0)
    with torch.no_grad():
        expected = torch.nn.utils.clip_grad_norm_(theirs, 2.0)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-12)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.numpy(), t.grad.detach().numpy(), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, as in torch
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_clip_grad_norm_with_a_non_finite_norm_scales_as_torch(bad):
    torch = pytest.importorskip("torch")
    values, grads = random_grads(), random_grads()
    grads[1][2] = bad
    ours, theirs = with_grads(values, grads), torch_with_grads(torch, values, grads)
    norm = optim.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    np.testing.assert_array_equal(norm.numpy(), expected.numpy())
    for p, t in zip(ours, theirs):
        np.testing.assert_array_equal(p.grad.numpy(), t.grad.numpy())  # NaN where torch has NaN, 0 where it has 0
    assert np.isnan(ours[0].grad.numpy()).all() == (bad != bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_clip_grad_norm_error_if_nonfinite_raises_and_leaves_the_gradients(bad):
    torch = pytest.importorskip("torch")
    values, grads = random_grads(), random_grads()
    grads[0][1, 1] = bad
    ours, theirs = with_grads(values, grads), torch_with_grads(torch, values, grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"total norm of order 2.0 of the gradients is (nan|inf).*error_if_nonfinite=False"):
        optim.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    for p, g in zip(ours, grads):
        np.testing.assert_array_equal(p.grad.numpy(), g)


def test_clip_grad_norm_error_if_nonfinite_with_a_finite_norm_clips():
    params = with_grads([np.zeros(2)], [[3.0, 4.0]])
    assert optim.clip_grad_norm_(params, 1.0, error_if_nonfinite=True).item() == pytest.approx(5.0)
    np.testing.assert_allclose(params[0].grad.numpy(), [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("options", [{}, {"norm_type": math.inf}, {"norm_type": 3}], ids=["l2", "inf", "p3"])
def test_clip_grad_norm_reads_nothing_from_the_device(sync_counter, options):
    params = with_grads([np.zeros(2), np.zeros((2, 2))], [[3.0, 4.0], [[1.0, 2.0], [3.0, 4.0]]])
    before = sync_counter.count
    norm = optim.clip_grad_norm_(params, 1.0, **options)
    optim.clip_grad_norm_(params[0], 1.0, **options)
    assert sync_counter.count == before
    assert norm.device == "cuda"


def test_clip_grad_norm_error_if_nonfinite_reads_the_norm_once(sync_counter):
    params = with_grads([np.zeros(2)], [[3.0, 4.0]])
    before = sync_counter.count
    optim.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert sync_counter.count - before == 1


# --- SGD dampening and Nesterov, Adam/AdamW amsgrad, against torch.optim -----------------------

def run_both(torch, make_ours, make_theirs, steps=6, grad_gaps=()):
    """Run our optimizer and torch's side by side on the same gradients, comparing parameters
    after every step; on the steps in `grad_gaps` the second parameter has no gradient."""
    values = random_grads()
    ours, theirs = [on_device(v, requires_grad=True) for v in values], [torch.tensor(v, requires_grad=True) for v in values]
    opt, torch_opt = make_ours(ours), make_theirs(theirs)
    for step in range(steps):
        # Big gradients first, then small ones: amsgrad's maximum then differs from the second moment.
        grads = random_grads(10.0 if step < 2 else 0.1)
        for index, (p, t, g) in enumerate(zip(ours, theirs, grads)):
            missing = index == 1 and step in grad_gaps
            p.grad = None if missing else on_device(g)
            t.grad = None if missing else torch.tensor(g)
        opt.step()
        torch_opt.step()
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=f"step {step + 1}")
    return opt, torch_opt


SGD_CASES = [
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(momentum=0.8, dampening=0.5),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.05),
    dict(momentum=0.5, dampening=1.0),
    dict(momentum=0.0, dampening=0.5),
]


@pytest.mark.parametrize("options", SGD_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_nesterov_and_dampening_match_torch_step_for_step(options):
    torch = pytest.importorskip("torch")
    run_both(torch, lambda ps: optim.SGD(ps, lr=0.05, **options), lambda ps: torch.optim.SGD(ps, lr=0.05, **options),
             grad_gaps=(0, 3))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_amsgrad_matches_torch_step_for_step(name, weight_decay):
    torch = pytest.importorskip("torch")
    options = dict(lr=0.02, betas=(0.8, 0.9), eps=1e-8, weight_decay=weight_decay, amsgrad=True)
    opt, torch_opt = run_both(torch, lambda ps: getattr(optim, name)(ps, **options),
                              lambda ps: getattr(torch.optim, name)(ps, **options), grad_gaps=(4,))
    for index, param in enumerate(torch_opt.param_groups[0]["params"]):
        np.testing.assert_allclose(backend.to_host(opt.state[index]["max_exp_avg_sq"]),
                                   torch_opt.state[param]["max_exp_avg_sq"].numpy(), rtol=1e-12)


def continue_after_reload(make, reload_into=None, steps=(3, 3)):
    """(uninterrupted parameters, parameters saved after steps[0] and reloaded into `reload_into`'s optimizer)."""
    values, grads = random_grads(), [random_grads(10.0 if i < 2 else 0.1) for i in range(sum(steps))]

    def run(opt, params, part):
        for step_grads in part:
            for p, g in zip(params, step_grads):
                p.grad = on_device(g)
            opt.step()

    a = [on_device(v, requires_grad=True) for v in values]
    opt_a = make(a)
    run(opt_a, a, grads[:steps[0]])
    saved = opt_a.state_dict()
    b = [on_device(p.numpy().copy(), requires_grad=True) for p in a]
    opt_b = (reload_into or make)(b)
    opt_b.load_state_dict(saved)
    run(opt_a, a, grads[steps[0]:])
    run(opt_b, b, grads[steps[0]:])
    return [p.numpy() for p in a], [p.numpy() for p in b], saved, opt_b


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_amsgrad_state_dict_holds_the_maximum_and_resumes_bit_identically(name):
    make = lambda ps: getattr(optim, name)(ps, lr=0.02, amsgrad=True)  # noqa: E731
    uninterrupted, resumed, saved, _ = continue_after_reload(make)
    assert saved["amsgrad"] is True and all("max_exp_avg_sq" in state for state in saved["state"].values())
    for x, y in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(x, y)


def test_amsgrad_state_dict_loaded_into_an_adam_without_amsgrad_switches_it_on():
    uninterrupted, resumed, _, loaded = continue_after_reload(lambda ps: optim.Adam(ps, lr=0.02, amsgrad=True),
                                                              reload_into=lambda ps: optim.Adam(ps, lr=0.02))
    assert loaded.amsgrad is True
    for x, y in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("options", [dict(momentum=0.8, dampening=0.5), dict(momentum=0.9, nesterov=True)],
                         ids=["dampening", "nesterov"])
def test_sgd_state_dict_with_dampening_or_nesterov_resumes_bit_identically(options):
    # Saved after one step too: the dampened buffer's first step is marked in the state.
    for steps in ((1, 3), (3, 3)):
        uninterrupted, resumed, saved, loaded = continue_after_reload(lambda ps: optim.SGD(ps, lr=0.05, **options),
                                                                      reload_into=lambda ps: optim.SGD(ps, lr=0.05),
                                                                      steps=steps)
        assert (loaded.momentum, loaded.dampening, loaded.nesterov) == (options["momentum"], options.get("dampening", 0.0),
                                                                       options.get("nesterov", False))
        for x, y in zip(uninterrupted, resumed):
            np.testing.assert_array_equal(x, y)


def test_a_state_dict_saved_before_the_new_options_still_loads():
    p = on_device(np.ones(3), requires_grad=True)
    for make, new in ((lambda ps: optim.Adam(ps, amsgrad=True), ("amsgrad",)),
                      (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), ("dampening", "nesterov"))):
        saved = make([p]).state_dict()
        old = {key: value for key, value in saved.items() if key not in new}
        loaded = make([p])
        loaded.load_state_dict(old)
        assert all(not getattr(loaded, name) for name in new)  # off, as every optimizer was before them


@pytest.mark.parametrize("make, error, message", [
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), ValueError, "Nesterov momentum needs momentum > 0 and dampening 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "Nesterov momentum needs momentum > 0 and dampening 0, got momentum=0.9, dampening=0.1"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=1.5), ValueError, r"dampening must be in \[0, 1\], got 1.5"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=1), TypeError, "nesterov must be True or False"),
    (lambda ps: optim.Adam(ps, amsgrad="yes"), TypeError, "amsgrad must be True or False, got 'yes'"),
    (lambda ps: optim.AdamW(ps, amsgrad=None), TypeError, "amsgrad must be True or False, got None"),
])
def test_invalid_optimizer_options_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make([on_device(np.ones(2), requires_grad=True)])


def test_invalid_combinations_are_refused_as_torch_refuses_them():
    torch = pytest.importorskip("torch")
    for options in (dict(nesterov=True), dict(momentum=0.9, dampening=0.1, nesterov=True)):
        with pytest.raises(ValueError):
            torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, **options)
        with pytest.raises(ValueError):
            optim.SGD([on_device(np.ones(2), requires_grad=True)], lr=0.1, **options)


# --- LayerNorm with a tuple or list shape -----------------------------------------------------

@pytest.mark.parametrize("shape", [6, (6,), [6], (2, 3), [2, 2, 3]], ids=str)
def test_layer_norm_takes_a_tuple_or_list_shape_as_torch(shape, kernel_path):
    torch = pytest.importorskip("torch")
    ours, theirs = nn.LayerNorm(shape, dtype=ta.float64), torch.nn.LayerNorm(shape, dtype=torch.float64)
    assert ours.normalized_shape == theirs.normalized_shape and ours.weight.shape == tuple(theirs.weight.shape)
    weight, bias = RNG.standard_normal(ours.weight.shape), RNG.standard_normal(ours.weight.shape)
    ours.load_state_dict({"weight": weight, "bias": bias})
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(weight))
        theirs.bias.copy_(torch.tensor(bias))
    x = RNG.standard_normal((2, 3) + ours.weight.shape) * 2 + 1
    seed = RNG.standard_normal(x.shape)
    ours_x, theirs_x = on_device(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, expected = ours(ours_x), theirs(theirs_x)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    (out * on_device(seed)).sum().backward()
    (expected * torch.tensor(seed)).sum().backward()
    for a, b in ((ours_x, theirs_x), (ours.weight, theirs.weight), (ours.bias, theirs.bias)):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_layer_norm_keeps_its_shape_as_a_tuple_and_names_it():
    assert repr(nn.LayerNorm((2, 3))) == "LayerNorm((2, 3), eps=1e-05)"
    assert nn.LayerNorm(np.int64(4)).normalized_shape == (4,)
    with pytest.raises(ValueError, match=r"LayerNorm\(\(2, 3\)\) needs input of shape \(\.\.\., 2, 3\), got \(4, 3, 2\)"):
        nn.LayerNorm((2, 3))(ta.zeros(4, 3, 2))
    with pytest.raises(ValueError, match=r"needs input of shape \(\.\.\., 2, 3\), got \(3,\)"):
        nn.LayerNorm([2, 3])(ta.zeros(3))
    with pytest.raises(ValueError, match="positive sizes, at least one, got"):
        nn.LayerNorm(())
    with pytest.raises(ValueError, match=r"positive sizes, at least one, got \(3, 0\)"):
        nn.LayerNorm((3, 0))
    with pytest.raises(TypeError, match="an int or a tuple or list of ints, got '6'"):
        nn.LayerNorm("6")


# --- random draws in float16 and float64 ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["ta.float16", "float16", np.float16, "float64", np.float32], ids=str)
def test_randn_and_rand_draw_in_the_asked_dtype(device, dtype):
    if dtype == "ta.float16":
        assert ta.float16 == np.float16 and backend.float16 == np.float16
        dtype = ta.float16
    normal = ta.randn(64, 64, dtype=dtype, generator=ta.Generator(0))
    uniform = ta.rand(64, 64, dtype=dtype, generator=ta.Generator(0))
    for t in (normal, uniform):
        assert t.dtype == np.dtype(dtype) and t.shape == (64, 64) and t.device == device
    values = uniform.numpy()
    assert values.min() >= 0 and values.max() < 1 and 0.45 < values.mean() < 0.55
    assert abs(normal.numpy().astype(np.float64).mean()) < 0.05
    np.testing.assert_array_equal(ta.rand(5, dtype=dtype, generator=ta.Generator(3)).numpy(),
                                  ta.rand(5, dtype=dtype, generator=ta.Generator(3)).numpy())


def test_rand_in_float16_never_rounds_up_to_one():
    values = ta.rand(200_000, dtype=ta.float16, generator=ta.Generator(1)).numpy()
    assert values.max() < 1.0 and values.max() >= 0.999  # the top float16 below 1 is 1 - 2**-11


def test_random_draws_in_an_integer_dtype_are_refused_clearly():
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError):
        torch.randn(2, dtype=torch.int64)
    for draw in (ta.randn, ta.rand):
        with pytest.raises(TypeError, match=f"{draw.__name__} draws floating-point values: .* got int64"):
            draw(2, dtype=ta.int64)


# --- a wrongly shaped attention mask ----------------------------------------------------------

MASK_MESSAGE = r"attention mask of shape \(2, 1, 4, 5\) must broadcast to the attention weights' shape \(\.\.\., queries, keys\) = "


def test_multi_head_attention_names_a_wrongly_shaped_mask(kernel_path):
    mha = nn.MultiHeadAttention(8, 2, generator=ta.Generator(0), dtype=ta.float64)
    x = on_device(RNG.standard_normal((2, 5, 8)), requires_grad=True)
    bad = on_device(np.ones((2, 1, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match=MASK_MESSAGE + r"\(2, 2, 5, 5\)$"):
        mha(x, mask=bad)[0].numpy()  # read it: the fused block's output is deferred
    with pytest.raises(ValueError, match=MASK_MESSAGE + r"\(2, 2, 5, 5\)$"):
        mha(x, mask=bad, causal=True, need_weights=True)
    context = on_device(RNG.standard_normal((2, 7, 8)))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 1, 5\) must broadcast to .* = \(2, 2, 5, 7\)$"):
        mha(x, context=context, mask=on_device(np.ones((2, 1, 1, 5), dtype=bool)))[0].numpy()


def test_masks_that_broadcast_still_work(kernel_path):
    mha = nn.MultiHeadAttention(8, 2, generator=ta.Generator(0), dtype=ta.float64)
    x = on_device(RNG.standard_normal((2, 5, 8)))
    reference, _ = mha(x)
    for shape in ((5,), (5, 5), (2, 1, 1, 5), (1, 2, 5, 5), (2, 2, 5, 5)):
        out, _ = mha(x, mask=on_device(np.ones(shape, dtype=bool)))
        np.testing.assert_allclose(out.numpy(), reference.numpy(), rtol=1e-12, atol=1e-14)


def test_scaled_dot_product_attention_names_a_wrongly_shaped_mask(kernel_path):
    q = on_device(RNG.standard_normal((2, 5, 4)), requires_grad=True)
    bad = on_device(np.ones((2, 1, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match=MASK_MESSAGE + r"\(2, 5, 5\)$"):
        F.scaled_dot_product_attention(q, q, q, mask=bad)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5, 5\) must broadcast to .* = \(2, 5, 5\)$"):
        F.scaled_dot_product_attention(q, q, q, mask=on_device(np.ones((3, 5, 5), dtype=bool)), causal=True)
    out = F.scaled_dot_product_attention(q, q, q, mask=on_device(np.ones((2, 1, 5), dtype=bool)))
    assert out.shape == (2, 5, 4)
