"""tinyattn.checkpoint: nested state round-trips exactly, writes are atomic, every error names its file."""
import json
import os
import zipfile

import numpy as np
import pytest

import tinyattn as ta
from tinyattn import backend, checkpoint
from tinyattn.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("device")  # every test runs on cpu and on cuda (tests/conftest.py)


def sample_state():
    generator = np.random.default_rng(12345)
    generator.random(7)  # advance it so the state is not the seed's
    return {
        "model": {"embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "head.bias": np.array([-1.5, 0.0, 2.25])},
        "tensor": ta.tensor([[1.0, 2.0], [3.0, 4.0]]),  # on the default device, which the device fixture sets
        "device_array": ta.tensor([0.5, -0.25]).data,  # a bare array on that device, as an optimizer's state holds
        "ints": np.array([1, -2, 3], dtype=np.int64),
        "flags": np.array([True, False]),
        "scalar_array": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "step": 41,
        "lr": 0.0029815325108927,
        "tiny": 1e-300,
        "name": "reverse ✓ ünïcode",
        "none": None,
        "yes": True,
        "list": [1, 2.5, "three", [4, {"five": np.full(2, 5, dtype=np.int64)}]],
        "tuple": (1, 2),
        "generator": generator.bit_generator.state,
        "big": 2**127 + 12345,
        "negative_big": -(2**100),
        "nested": {"a": {"b": {"c": np.ones((2, 2, 2), dtype=np.float32)}}},
        "empty_dict": {},
        "empty_list": [],
    }


def assert_same(loaded, original):
    if isinstance(original, ta.Tensor):
        original = original.numpy()
    elif backend.is_array(original):
        original = backend.to_host(original)  # a checkpoint loads every array on the host
    if isinstance(original, np.ndarray):
        assert isinstance(loaded, np.ndarray)
        assert loaded.dtype == original.dtype and loaded.shape == original.shape
        assert np.array_equal(loaded, original)
    elif isinstance(original, dict):
        assert isinstance(loaded, dict) and set(loaded) == set(original)
        for key in original:
            assert_same(loaded[key], original[key])
    elif isinstance(original, (list, tuple)):
        assert isinstance(loaded, list) and len(loaded) == len(original)
        for a, b in zip(loaded, original):
            assert_same(a, b)
    else:
        assert type(loaded) is type(original) and loaded == original


def test_round_trip_of_nested_state(tmp_path):
    state = sample_state()
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, state)
    loaded = checkpoint.load(path)
    assert_same(loaded, state)
    assert loaded["big"] == 2**127 + 12345  # exact, not a float


def test_a_generator_state_resumes_the_same_numbers(tmp_path):
    generator = np.random.default_rng(7)
    generator.normal(size=100)
    checkpoint.save(tmp_path / "g.npz", {"g": generator.bit_generator.state})
    expected = generator.normal(size=5)
    restored = np.random.default_rng()
    restored.bit_generator.state = checkpoint.load(tmp_path / "g.npz")["g"]
    assert np.array_equal(restored.normal(size=5), expected)


def test_saved_arrays_are_copies_not_views(tmp_path):
    weights = np.ones(4, dtype=np.float32)
    checkpoint.save(tmp_path / "c.npz", {"w": weights})
    weights[:] = 9
    assert np.array_equal(checkpoint.load(tmp_path / "c.npz")["w"], np.ones(4, dtype=np.float32))


def test_file_is_a_plain_npz_with_the_marker_and_no_pickles(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, sample_state())
    with open(path, "rb") as file:
        assert file.read(4) == checkpoint.ZIP_MAGIC
    with np.load(path, allow_pickle=False) as archive:
        assert str(archive["__format__"]) == checkpoint.FORMAT
        json.loads(str(archive["__skeleton__"]))
        for name in archive.files:
            assert archive[name].dtype != object


def test_keys_with_slashes_do_not_collide(tmp_path):
    """Array slots are named by joining keys with '/'; a key containing '/' must not overwrite another array."""
    state = {"a/b": np.zeros(2), "a": {"b": np.ones(3)}, "x": [np.full(1, 7.0)], "x/0": np.full(1, 8.0)}
    checkpoint.save(tmp_path / "c.npz", state)
    assert_same(checkpoint.load(tmp_path / "c.npz"), state)


def test_save_replaces_an_existing_checkpoint_and_creates_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "checkpoint.npz"
    checkpoint.save(path, {"step": 1})
    checkpoint.save(path, {"step": 2})
    assert checkpoint.load(path) == {"step": 2}
    assert os.listdir(path.parent) == ["checkpoint.npz"]


def test_save_to_a_bare_file_name_writes_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint.save("c.npz", {"step": 3})
    assert checkpoint.load("c.npz") == {"step": 3}
    assert os.listdir(tmp_path) == ["c.npz"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, {"step": 1, "w": np.ones(3)})
    before = path.read_bytes()
    real_save_arrays = checkpoint.save_arrays

    def half_write(file, arrays):
        real_save_arrays(file, arrays)  # a whole archive's bytes go out, then the write "fails" before the rename
        file.seek(0)
        file.write(b"PK\x03\x04 garbage")
        raise error

    monkeypatch.setattr(checkpoint, "save_arrays", half_write)
    with pytest.raises(type(error)):
        checkpoint.save(path, {"step": 2, "w": np.zeros(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]
    assert checkpoint.load(path)["step"] == 1


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(file, arrays):
        file.write(b"PK\x03\x04partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint, "save_arrays", fail)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "checkpoint.npz", {"step": 1})
    assert os.listdir(tmp_path) == []


def test_unserialisable_state_fails_before_touching_the_file(tmp_path):
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        checkpoint.save(path, {"step": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


# --- errors name the file ----------------------------------------------------------------

def write_bad_files(folder):
    good = folder / "good.npz"
    checkpoint.save(good, {"w": np.arange(1000, dtype=np.float32), "step": 5})
    data = good.read_bytes()
    files = {}
    files["missing"] = (folder / "nope.npz", "no such file")
    (folder / "truncated.npz").write_bytes(data[: len(data) // 2])
    files["truncated"] = (folder / "truncated.npz", "truncated")
    (folder / "text.npz").write_text("hello\n")
    files["text"] = (folder / "text.npz", "not an .npz file")
    (folder / "empty.npz").write_bytes(b"")
    files["empty"] = (folder / "empty.npz", "not an .npz file")
    np.savez(folder / "foreign.npz", a=np.ones(2))
    files["foreign"] = (folder / "foreign.npz", "not a tinyattn checkpoint")
    np.savez(folder / "wrong-format.npz", __format__=np.array("tinyattn-checkpoint-999"), __skeleton__=np.array("{}"))
    files["wrong-format"] = (folder / "wrong-format.npz", "not a tinyattn checkpoint")
    np.savez(folder / "pickled.npz", __format__=np.array(checkpoint.FORMAT), __skeleton__=np.array("{}"),
             x=np.array([{"code": "run me"}], dtype=object))
    files["pickled"] = (folder / "pickled.npz", "pickle")
    np.savez(folder / "bad-json.npz", __format__=np.array(checkpoint.FORMAT), __skeleton__=np.array("{not json"))
    files["bad-json"] = (folder / "bad-json.npz", "damaged")
    np.savez(folder / "dangling.npz", __format__=np.array(checkpoint.FORMAT),
             __skeleton__=np.array(json.dumps({"w": {checkpoint.ARRAY_MARK: "state/w"}})))
    files["dangling"] = (folder / "dangling.npz", "damaged")
    with zipfile.ZipFile(folder / "plain.zip.npz", "w") as archive:
        archive.writestr("readme.txt", "a zip, but not of arrays")
    files["plain-zip"] = (folder / "plain.zip.npz", "")
    return files


BAD = ["missing", "truncated", "text", "empty", "foreign", "wrong-format", "pickled", "bad-json", "dangling", "plain-zip"]


@pytest.mark.parametrize("name", BAD)
def test_every_load_error_is_a_checkpoint_error_naming_the_file(tmp_path, name):
    path, problem = write_bad_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path}: ")
    assert problem in message
    assert "\n" not in message
    assert caught.value.path == path


def test_checkpoint_error_format():
    error = CheckpointError("runs/x.npz", "no such file")
    assert str(error) == "checkpoint runs/x.npz: no such file"
    assert error.path == "runs/x.npz"


def test_loading_a_pickled_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.savez(tmp_path / "evil.npz", __format__=np.array(checkpoint.FORMAT), __skeleton__=np.array("{}"),
             x=np.array([Payload()], dtype=object))
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(tmp_path / "evil.npz")
    assert not marker.exists()
