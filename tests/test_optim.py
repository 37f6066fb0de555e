"""Optimizers, gradient clipping and lr schedules against updates worked out by hand in float64."""
import math

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import backend, optim

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)

P0 = np.array([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]])
G1 = np.array([[0.1, -0.2, 0.3], [-0.4, 0.5, 0.0]])
G2 = np.array([[-0.3, 0.1, 0.2], [0.6, -0.1, 0.7]])


def on_device(array, **options):
    """A tensor of host `array` on the default device, which the device fixture sets (ta.tensor keeps a numpy array on the cpu)."""
    return ta.tensor(array, device=ta.get_default_device(), **options)


def param(values=P0, dtype=np.float64):
    return on_device(np.array(values, dtype=dtype), requires_grad=True)


def run_steps(optimizer, p, grads):
    for grad in grads:
        p.grad = on_device(np.array(grad, dtype=p.dtype))
        optimizer.step()


def adam_by_hand(p, grads, lr, beta1, beta2, eps, weight_decay, decoupled):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


# --- one or two steps against the formula --------------------------------------------

def test_sgd_step_is_p_minus_lr_grad():
    p = param()
    run_steps(optim.SGD([p], lr=0.1), p, [G1])
    np.testing.assert_allclose(p.numpy(), P0 - 0.1 * G1, rtol=0, atol=1e-15)


def test_sgd_weight_decay_adds_wd_times_p_to_the_grad():
    p = param()
    run_steps(optim.SGD([p], lr=0.1, weight_decay=0.01), p, [G1])
    np.testing.assert_allclose(p.numpy(), P0 - 0.1 * (G1 + 0.01 * P0), rtol=0, atol=1e-15)


def test_sgd_momentum_buffer_starts_at_the_grad_and_accumulates():
    p = param()
    run_steps(optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01), p, [G1, G2])
    buffer1 = G1 + 0.01 * P0
    p1 = P0 - 0.1 * buffer1
    buffer2 = 0.9 * buffer1 + (G2 + 0.01 * p1)
    np.testing.assert_allclose(p.numpy(), p1 - 0.1 * buffer2, rtol=0, atol=1e-15)


def test_adam_first_step_moves_each_element_by_about_lr():
    p = param()
    run_steps(optim.Adam([p], lr=0.01), p, [G1])
    # m_hat = g and v_hat = g*g after one step, so the update is lr * g / (|g| + eps).
    np.testing.assert_allclose(p.numpy(), P0 - 0.01 * G1 / (np.abs(G1) + 1e-8), rtol=0, atol=1e-15)


def test_adam_two_steps_with_l2_weight_decay():
    p = param()
    run_steps(optim.Adam([p], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), p, [G1, G2])
    expected = adam_by_hand(P0, [G1, G2], 0.01, 0.8, 0.99, 1e-6, 0.1, decoupled=False)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-13, atol=1e-15)


def test_adamw_two_steps_with_decoupled_weight_decay():
    p = param()
    opt = optim.AdamW([p], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    run_steps(opt, p, [G1, G2])
    expected = adam_by_hand(P0, [G1, G2], 0.01, 0.8, 0.99, 1e-6, 0.1, decoupled=True)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-13, atol=1e-15)
    l2_decay = adam_by_hand(P0, [G1, G2], 0.01, 0.8, 0.99, 1e-6, 0.1, decoupled=False)
    assert not np.allclose(expected, l2_decay, rtol=1e-6, atol=0)  # the two decays really differ here


def test_adamw_default_weight_decay_is_pytorchs():
    assert optim.AdamW([param()]).weight_decay == 0.01
    assert optim.Adam([param()]).weight_decay == 0.0


def test_adam_bias_correction_counts_steps_per_parameter():
    late, early = param(), param()
    opt = optim.Adam([late, early], lr=0.01)
    early.grad = on_device(G1)
    opt.step()
    late.grad = on_device(G2)
    opt.step()
    # `late` took its first step at the optimizer's second, so it moves as a first step does.
    np.testing.assert_allclose(late.numpy(), P0 - 0.01 * G2 / (np.abs(G2) + 1e-8), rtol=0, atol=1e-15)


# --- in place, dtypes, skipping ---------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.01),
    lambda ps: optim.AdamW(ps, lr=0.01),
], ids=["sgd", "adam", "adamw"])
def test_float32_params_and_state_stay_float32_and_are_updated_in_place(make):
    p = param(dtype=np.float32)
    array = p.data
    opt = make([p])
    opt.lr = np.float64(opt.lr)  # a numpy float64 lr must not turn the arithmetic into float64
    run_steps(opt, p, [G1, G2])
    assert p.data is array and p.dtype == np.float32
    assert not np.array_equal(p.numpy(), P0.astype(np.float32))
    assert type(opt.lr) is float
    for value in opt.state_dict()["state"]["0"].values():
        assert not backend.is_array(value) or value.dtype == np.float32


def test_zero_grad_clears_every_grad():
    a, b = param(), param()
    a.grad, b.grad = on_device(G1), on_device(G2)
    optim.SGD([a, b], lr=0.1).zero_grad()
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_params_without_grad_are_left_alone(cls):
    with_grad, without_grad = param(), param()
    opt = cls([with_grad, without_grad], lr=0.1, weight_decay=0.1)
    with_grad.grad = on_device(G1)
    opt.step()
    np.testing.assert_array_equal(without_grad.numpy(), P0)
    assert not np.array_equal(with_grad.numpy(), P0)


def test_optimizer_trains_through_backward():
    target = np.array([1.0, -2.0, 3.0])
    p = param(np.zeros(3))
    opt = optim.Adam([p], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        ((p - on_device(target)) ** 2).sum().backward()
        opt.step()
    np.testing.assert_allclose(p.numpy(), target, atol=1e-2)


# --- state_dict ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
    lambda ps: optim.AdamW(ps, lr=0.01),
], ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_resumes_bit_identically(make):
    grads = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    a = [param(dtype=np.float32), param(P0[::-1], dtype=np.float32)]
    opt_a = make(a)
    for grad in grads[:3]:
        for p in a:
            p.grad = on_device(grad) * p.detach()
        opt_a.step()
    saved = opt_a.state_dict()
    b = [param(p.numpy().copy(), dtype=np.float32) for p in a]
    opt_b = make(b)
    opt_b.lr = 0.5  # restored from the state_dict
    opt_b.load_state_dict(saved)
    assert opt_b.lr == opt_a.lr and opt_b.state_dict()["step"] == 3
    for grad in grads[3:]:
        for params, opt in ((a, opt_a), (b, opt_b)):
            for p in params:
                p.grad = on_device(grad) * p.detach()
            opt.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())


def test_state_dict_holds_plain_values_and_copies():
    p = param()
    opt = optim.Adam([p], lr=0.01)
    run_steps(opt, p, [G1])
    saved = opt.state_dict()
    assert type(saved["step"]) is int and type(saved["lr"]) is float
    assert saved["betas"] == (0.9, 0.999) and saved["eps"] == 1e-8 and saved["weight_decay"] == 0.0
    exp_avg = backend.to_host(saved["state"]["0"]["exp_avg"]).copy()
    run_steps(opt, p, [G2])
    np.testing.assert_array_equal(backend.to_host(saved["state"]["0"]["exp_avg"]), exp_avg)
    assert saved["step"] == 1


def test_load_state_dict_copies_so_the_saved_dict_is_not_mutated():
    p, q = param(), param()
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    run_steps(opt, p, [G1])
    saved = opt.state_dict()
    buffer = backend.to_host(saved["state"]["0"]["momentum"]).copy()
    loaded = optim.SGD([q], lr=0.1, momentum=0.9)
    loaded.load_state_dict(saved)
    run_steps(loaded, q, [G2])
    np.testing.assert_array_equal(backend.to_host(saved["state"]["0"]["momentum"]), buffer)


def test_load_state_dict_restores_the_hyperparameters():
    saved = optim.Adam([param()], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1).state_dict()
    loaded = optim.Adam([param()])
    loaded.load_state_dict(saved)
    assert (loaded.lr, loaded.betas, loaded.eps, loaded.weight_decay) == (0.01, (0.8, 0.99), 1e-6, 0.1)


def test_load_state_dict_names_the_shape_mismatch():
    saved = optim.Adam([param(), param()]).state_dict()
    other = optim.Adam([param(), param(np.zeros((3, 2)))])
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(2, 3\), the parameter has shape \(3, 2\)"):
        other.load_state_dict(saved)


def test_load_state_dict_names_the_parameter_count_mismatch():
    saved = optim.SGD([param(), param()], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="state for 2 parameters, this optimizer has 1"):
        optim.SGD([param()], lr=0.1).load_state_dict(saved)


def test_load_state_dict_from_another_optimizer_type_is_refused():
    saved = optim.SGD([param()], lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"lacks \['betas', 'eps'\]"):
        optim.Adam([param()]).load_state_dict(saved)


# --- bad arguments --------------------------------------------------------------------------

def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
def test_lr_must_be_positive(lr):
    with pytest.raises(ValueError, match=f"lr must be > 0, got {lr}"):
        optim.SGD([param()], lr=lr)


@pytest.mark.parametrize("make, message", [
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=-1), "weight_decay must be >= 0, got -1"),
    (lambda ps: optim.Adam(ps, betas=(0.9, 1.5)), r"betas\[1\] must be in \[0, 1\), got 1.5"),
    (lambda ps: optim.Adam(ps, eps=-1e-8), "eps must be >= 0, got -1e-08"),
    (lambda ps: optim.SGD(ps + [np.zeros(2)], lr=0.1), "parameter 1 is a ndarray, expected a Tensor"),
])
def test_bad_hyperparameters_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make([param()])


# --- clip_grad_norm_ --------------------------------------------------------------------------

def grads_with_norm_13(dtype=np.float64):
    a, b, no_grad = param(np.zeros(2), dtype), param(np.zeros(1), dtype), param(np.zeros(4), dtype)
    a.grad = on_device(np.array([3.0, 4.0], dtype=dtype))
    b.grad = on_device(np.array([12.0], dtype=dtype))
    return [a, b, no_grad]


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before():
    params = grads_with_norm_13(np.float32)
    norm = optim.clip_grad_norm_(params, 1.3)
    assert isinstance(norm, ta.Tensor) and norm.shape == () and norm.dtype == np.float64  # stays on the device, as in PyTorch
    assert norm.item() == pytest.approx(13.0, rel=1e-7)
    clipped = np.concatenate([params[0].grad.numpy(), params[1].grad.numpy()])
    assert clipped.dtype == np.float32
    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(1.3, abs=1e-5)
    np.testing.assert_allclose(clipped, np.array([3.0, 4.0, 12.0]) / 10, rtol=1e-6)
    assert params[2].grad is None


def test_clip_grad_norm_below_max_norm_changes_nothing():
    params = grads_with_norm_13()
    assert optim.clip_grad_norm_(params, 20.0).item() == pytest.approx(13.0, rel=1e-15)
    np.testing.assert_array_equal(params[0].grad.numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(params[1].grad.numpy(), [12.0])


def test_clip_grad_norm_needs_a_positive_max_norm():
    with pytest.raises(ValueError, match="max_norm must be > 0, got -1"):
        optim.clip_grad_norm_(grads_with_norm_13(), -1)


# --- schedules ------------------------------------------------------------------------------

def test_warmup_cosine_values():
    opt = optim.SGD([param()], lr=1.0)
    schedule = optim.WarmupCosine(opt, warmup_steps=4, total_steps=12, min_lr=0.1)
    assert opt.lr == schedule.last_lr == 0.25  # set for step 1 on construction
    assert schedule.get_lr(4) == 1.0  # peak at the end of warmup
    assert schedule.get_lr(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-15)  # 0.868...
    assert schedule.get_lr(8) == pytest.approx(0.55, rel=1e-15)  # halfway through the decay
    assert schedule.get_lr(12) == pytest.approx(0.1, rel=1e-15)
    assert schedule.get_lr(50) == 0.1
    for _ in range(5):
        schedule.step()
    assert opt.lr == schedule.last_lr == schedule.get_lr(6)


def test_inverse_sqrt_values():
    opt = optim.Adam([param()], lr=2.0)
    schedule = optim.InverseSqrt(opt, warmup_steps=4)
    assert opt.lr == 0.5
    assert [schedule.get_lr(step) for step in (2, 4, 16, 100)] == [1.0, 2.0, 1.0, pytest.approx(0.4, rel=1e-15)]
    schedule.step()
    assert opt.lr == schedule.last_lr == 1.0


@pytest.mark.parametrize("make", [
    lambda opt: optim.WarmupCosine(opt, warmup_steps=3, total_steps=10, min_lr=0.01),
    lambda opt: optim.InverseSqrt(opt, warmup_steps=3),
], ids=["warmup_cosine", "inverse_sqrt"])
def test_schedule_state_dict_resumes_exactly(make):
    opt_a = optim.SGD([param()], lr=0.3)
    schedule_a = make(opt_a)
    for _ in range(4):
        schedule_a.step()
    opt_b = optim.SGD([param()], lr=0.7)  # a different base lr, replaced on load
    schedule_b = make(opt_b)
    schedule_b.load_state_dict(schedule_a.state_dict())
    assert opt_b.lr == opt_a.lr
    lrs_a, lrs_b = [], []
    for _ in range(8):
        schedule_a.step()
        schedule_b.step()
        lrs_a.append(opt_a.lr)
        lrs_b.append(opt_b.lr)
    assert lrs_a == lrs_b


@pytest.mark.parametrize("make, message", [
    (lambda opt: optim.WarmupCosine(opt, -1, 10), "warmup_steps must be >= 0, got -1"),
    (lambda opt: optim.WarmupCosine(opt, 10, 10), r"total_steps must be > warmup_steps \(10\), got 10"),
    (lambda opt: optim.WarmupCosine(opt, 2, 10, min_lr=0.5), r"min_lr must be in \[0, base lr 0.1\], got 0.5"),
    (lambda opt: optim.InverseSqrt(opt, 0), "warmup_steps must be >= 1, got 0"),
    (lambda opt: optim.InverseSqrt(opt, 4).get_lr(0), "steps count from 1, got 0"),
])
def test_schedule_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make(optim.SGD([param()], lr=0.1))


@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1), lambda ps: optim.AdamW(ps, lr=0.01)],
                         ids=["adam", "adamw"])
def test_flat_group_update_equals_per_parameter_update(make):
    rng = np.random.default_rng(3)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    flat_params = [on_device(v.copy(), requires_grad=True) for v in values]
    single_params = [on_device(v.copy(), requires_grad=True) for v in values]
    idle = on_device(np.zeros(2, dtype=np.float32), requires_grad=True)  # never has a grad: forces the per-parameter path
    flat, single = make(flat_params), make(single_params + [idle])
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for p, q, g in zip(flat_params, single_params, grads):
            p.grad, q.grad = on_device(g), on_device(g.copy())
        flat.step()
        single.step()
    for p, q in zip(flat_params, single_params):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    assert flat.state[0]["exp_avg"].base is not None  # the moments are views of the group's flat buffer
