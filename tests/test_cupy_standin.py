"""The CuPy stand-in itself: as strict as CuPy at the host boundary, views that share memory, and counted syncs."""
import numpy as np
import pytest

import cupy_standin as cp


def device_array(*shape):
    return cp.asarray(np.arange(float(np.prod(shape))).reshape(shape))


def test_its_arrays_are_not_numpy_arrays():
    a = device_array(2, 3)
    assert isinstance(a, cp.ndarray) and not isinstance(a, np.ndarray)
    assert (a.shape, a.dtype, a.ndim, a.size) == ((2, 3), np.float64, 2, 6)


@pytest.mark.parametrize("use_numpy", [
    lambda a: np.exp(a),
    lambda a: np.concatenate([a, a]),
    lambda a: np.asarray(a),
    lambda a: np.testing.assert_array_equal(a, 0.0),
    lambda a: np.ones(3) + a,
    lambda a: a + np.ones(3),
    lambda a: cp.maximum(a, np.ones(3)),
], ids=["ufunc", "function", "asarray", "testing", "numpy_plus_device", "device_plus_numpy", "mixed_arguments"])
def test_numpy_on_device_data_is_a_type_error(use_numpy):
    with pytest.raises(TypeError):
        use_numpy(device_array(3))


def test_the_error_names_the_numpy_function_or_says_how_to_transfer():
    with pytest.raises(TypeError, match="numpy.exp"):
        np.exp(device_array(3))
    with pytest.raises(TypeError, match=r"Implicit conversion.*\.get\(\)"):
        np.asarray(device_array(3))


def test_explicit_transfers_copy_both_ways():
    host = np.arange(3.0)
    a = cp.asarray(host)
    host[0] = 7.0  # the device holds its own copy
    np.testing.assert_array_equal(a.get(), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(cp.asnumpy(a * 2), [0.0, 2.0, 4.0])
    assert isinstance(a.get(), np.ndarray) and cp.asarray(a) is a


def test_views_write_through_to_their_base():
    wide = cp.zeros((2, 6))
    cp.matmul(device_array(2, 3), cp.ones((3, 2)), out=wide[:, 2:4])  # one head's columns of a wider array
    np.testing.assert_array_equal(wide.get(), [[0, 0, 3, 3, 0, 0], [0, 0, 12, 12, 0, 0]])
    column = wide[:, 0]
    column += 1.0
    wide.reshape(-1)[-1] = 5.0
    np.testing.assert_array_equal(wide.get()[:, 0], [1.0, 1.0])
    assert wide.get()[1, 5] == 5.0


def test_out_is_returned_as_the_same_array():
    a = device_array(3)
    assert cp.tanh(a, out=a) is a


def test_reductions_and_comparisons_stay_on_the_device():
    a = device_array(2, 3)
    assert isinstance(a.sum(), cp.ndarray) and a.sum().shape == ()
    assert isinstance(a > 2, cp.ndarray) and (a > 2).dtype == np.bool_


def test_random_draws_are_device_arrays_from_a_seed():
    first, second = cp.random.default_rng(3), cp.random.default_rng(3)
    for draw in ("random", "standard_normal"):
        x, y = getattr(first, draw)((4,), dtype=cp.float32), getattr(second, draw)((4,), dtype=cp.float32)
        assert isinstance(x, cp.ndarray) and x.dtype == np.float32
        np.testing.assert_array_equal(x.get(), y.get())
    assert first.integers(0, 5, size=3).dtype == np.int64 and first.uniform(size=2).shape == (2,)


def test_integer_array_indices_wrap_around_as_on_a_gpu():
    a = device_array(2, 3)
    np.testing.assert_array_equal(a[:, cp.asarray([3, -1])].get(), [[0.0, 2.0], [3.0, 5.0]])
    a[cp.asarray([2]), ...] = -1.0
    np.testing.assert_array_equal(a.get()[0], [-1.0, -1.0, -1.0])
    with pytest.raises(IndexError):
        a[2]  # a Python int is checked on the host, as CuPy does


def test_scatter_add_sums_repeated_indices():
    target = cp.zeros(3)
    cp.cupyx.scatter_add(target, (cp.asarray([0, 2, 0]),), cp.ones(3))
    np.testing.assert_array_equal(target.get(), [2.0, 0.0, 1.0])


READS = {
    "item": lambda a: a[0].item(),
    "float": lambda a: float(a[0]),
    "int": lambda a: int(a[0]),
    "bool": lambda a: bool(a[0] > 0),
    "index": lambda a: [10, 20, 30][cp.asarray(1)],
    "get": lambda a: a.get(),
    "asnumpy": lambda a: cp.asnumpy(a),
    "tolist": lambda a: a.tolist(),
    "repr": repr,
    "str": str,
    "format": lambda a: f"{a[0]:.2f}",
    "boolean_mask": lambda a: a[a > 1],
    "nonzero": lambda a: cp.nonzero(a),
}


@pytest.mark.parametrize("name", READS)
def test_each_read_on_the_host_is_one_sync(name):
    a = device_array(3)
    with cp.count_syncs() as counter:
        READS[name](a)
    assert counter.count == 1


def test_device_work_makes_no_sync():
    a = device_array(2, 3)
    before = cp.syncs()
    with cp.count_syncs() as counter:
        b = a.T @ cp.exp(a) + (a > 1).sum(axis=0, keepdims=True).astype(cp.float64)
        b[0, :] = b.max()
        b += cp.where(b > 3.0, b, 0.0)[::-1]
    assert counter.count == 0 and cp.syncs() == before
    b.get()
    assert counter.count == 0 and cp.syncs() == before + 1
