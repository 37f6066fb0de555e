"""Making tensors, their attributes, dtypes and error messages."""
import numpy as np
import pytest

import tinyattn as ta

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


def test_python_floats_become_float32_and_ints_int64():
    assert ta.tensor(1.5).dtype == ta.float32
    assert ta.tensor([[1.0, 2.0]]).dtype == ta.float32
    assert ta.tensor([1, 2.5]).dtype == ta.float32
    assert ta.tensor([1, 2]).dtype == ta.int64
    assert ta.tensor([True, False]).dtype == ta.bool_


def test_numpy_arrays_keep_their_dtype_and_explicit_dtype_wins(device):
    assert ta.tensor(np.zeros(2, dtype=np.float64), device=device).dtype == ta.float64
    assert ta.tensor(np.zeros(2, dtype=np.int32), device=device).dtype == np.int32
    assert ta.tensor([1, 2], dtype="float64").dtype == ta.float64


def test_numpy_arrays_go_to_the_default_device_as_python_data_does(device):
    assert ta.tensor(np.zeros(2)).device == ta.tensor([0.0]).device == device  # as torch.tensor(ndarray) does
    assert ta.tensor(np.zeros(2), device="cpu").device == "cpu"


def test_attributes(device):
    t = ta.tensor(np.arange(6.0).reshape(2, 3), device=device)
    assert (t.shape, t.ndim, t.size, t.device, len(t)) == ((2, 3), 2, 6, device, 2)
    assert isinstance(t.numpy(), np.ndarray)
    assert ta.tensor([4.0]).item() == 4.0
    assert t.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert t.is_leaf and t.grad is None and not t.requires_grad


def test_item_of_many_elements_is_an_error():
    with pytest.raises(ValueError, match=r"one element.*\(2,\)"):
        ta.tensor([1.0, 2.0]).item()


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point.*int64"):
        ta.tensor([1, 2], requires_grad=True)


def test_factories(device):
    np.testing.assert_array_equal(ta.zeros(2, 3).numpy(), np.zeros((2, 3)))
    np.testing.assert_array_equal(ta.ones((2,)).numpy(), [1.0, 1.0])
    assert ta.zeros(2, 3).dtype == ta.float32
    np.testing.assert_array_equal(ta.full((2,), 7.0).numpy(), [7.0, 7.0])
    assert ta.full((2,), 7).dtype == ta.int64
    np.testing.assert_array_equal(ta.arange(5).numpy(), np.arange(5))
    assert ta.arange(5).dtype == ta.int64 and ta.arange(0.0, 1.0, 0.25).dtype == ta.float32
    np.testing.assert_array_equal(ta.arange(1, 7, 2).numpy(), [1, 3, 5])
    assert ta.zeros(2).device == ta.full((2,), 7.0).device == ta.arange(5).device == device
    like = ta.tensor(np.ones((2, 2)), device=device)
    assert ta.zeros_like(like).device == device and ta.zeros_like(like).dtype == ta.float64 and ta.ones_like(like).numpy().sum() == 4


def test_random_tensors_are_reproducible_from_a_seeded_generator():
    first = ta.randn(3, 4, generator=ta.Generator(7))
    second = ta.randn(3, 4, generator=ta.Generator(7))
    other = ta.randn(3, 4, generator=ta.Generator(8))
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    assert not np.array_equal(first.numpy(), other.numpy())
    assert first.dtype == ta.float32 and first.shape == (3, 4)
    assert first.device == ta.rand(2).device == ta.get_default_device()
    uniform = ta.rand(1000, generator=ta.Generator(0)).numpy()
    assert uniform.min() >= 0.0 and uniform.max() < 1.0
    ta.manual_seed(3)
    a = ta.randn(2)
    ta.manual_seed(3)
    np.testing.assert_array_equal(a.numpy(), ta.randn(2).numpy())


def test_repr_shows_values_and_graph(device):
    x = ta.tensor([1.0, 2.0], requires_grad=True)
    on_device = "" if device == "cpu" else f", device='{device}'"
    assert repr(x) == f"tensor([1., 2.], dtype=float32{on_device}, requires_grad=True)"
    assert "grad_fn=Mul" in repr(x * 2.0)


def test_truth_value_of_many_elements_is_an_error():
    with pytest.raises(ValueError, match="ambiguous"):
        bool(ta.tensor([1.0, 2.0]) > 0)
    assert bool(ta.tensor([1.0]) > 0)


def test_tensors_are_hashable_by_identity():
    a, b = ta.tensor([1.0]), ta.tensor([1.0])
    assert len({a, b}) == 2


def test_numpy_scalar_on_the_left_gives_a_tensor():
    x = ta.tensor([1.0, 2.0])
    result = np.float32(2.0) * x
    assert isinstance(result, ta.Tensor) and result.dtype == ta.float32


def test_matmul_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\).*3 != 4"):
        ta.ones(2, 3) @ ta.ones(4, 5)


def test_binary_op_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"Add on shapes \(2, 3\) and \(4,\)"):
        ta.ones(2, 3) + ta.ones(4)


def test_bad_axes_and_shapes_are_clear_errors():
    x = ta.ones(2, 3)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        x.sum(axis=2)
    with pytest.raises(ValueError, match="squeeze axis 1 of shape"):
        x.squeeze(1)
    with pytest.raises(ValueError, match=r"Reshape on shapes \(2, 3\)"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match="not a permutation"):
        x.transpose(0, 0)
    with pytest.raises(ValueError, match="equal sections"):
        ta.split(x, 2, axis=1)
    with pytest.raises(TypeError, match="boolean condition"):
        ta.where(x, x, x)


def test_integer_true_division_gives_float32():
    assert (ta.tensor([1, 2]) / 2).dtype == ta.float32
    assert (ta.tensor([1, 2]) / ta.tensor([2, 4])).dtype == ta.float32
    np.testing.assert_array_equal((ta.tensor([1, 2]) / 2).numpy(), [0.5, 1.0])


def test_numpy_subclasses_such_as_memmap_mix_with_plain_tensors(tmp_path, device):
    path = tmp_path / "w.npy"
    np.save(path, np.arange(3.0, dtype=np.float32))
    mapped = ta.tensor(np.load(path, mmap_mode="r"), device=device)
    np.testing.assert_array_equal((mapped + ta.tensor([1.0, 1.0, 1.0])).numpy(), [1.0, 2.0, 3.0])


def test_tensor_copies_array_data_so_in_place_updates_stay_inside(device):
    source = np.zeros(3, dtype=np.float32)
    t = ta.tensor(source, requires_grad=True, device=device)
    t.data += 1.0
    np.testing.assert_array_equal(source, [0.0, 0.0, 0.0])
