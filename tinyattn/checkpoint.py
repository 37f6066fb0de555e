"""Checkpoints: model, optimizer, schedule and training state in one .npz file.

Written atomically (a temporary file in the same folder, flushed, then renamed over the
target), so an interrupted save never leaves a half-written checkpoint behind, and read
with pickle disabled, so opening a checkpoint cannot run code. Everything that is not an
array (the config, generator states, step counts) travels as JSON text inside the file.
"""
import json
import os
import tempfile
import tokenize
import zipfile
import zlib

import numpy  # the .npz format itself; tensor data reaches it as host copies (backend.to_host)

from . import backend
from .engine import Tensor

FORMAT = "tinyattn-checkpoint-1"
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".checkpoint-", ".npz.tmp"  # what `save` writes before the rename
ARRAY_MARK = "__array__"
ZIP_MAGIC = b"PK\x03\x04"  # .npz files are zip archives
READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # what zipfile reads


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not what was expected; the message names the file."""

    def __init__(self, path, problem):
        super().__init__(f"checkpoint {path}: {problem}")
        self.path, self.problem = path, problem


def _split(tree, arrays):
    """Replace arrays in a nested dict/list by markers, collecting them in `arrays`."""
    if isinstance(tree, Tensor):
        tree = tree.data
    if backend.is_array(tree):
        name = f"array{len(arrays)}"  # numbered, not named by path: any key (even one with '/') is safe
        arrays[name] = tree
        return {ARRAY_MARK: name}
    if isinstance(tree, dict):
        return {str(key): _split(value, arrays) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(value, arrays) for value in tree]
    return tree


def _join(tree, arrays):
    if isinstance(tree, dict):
        if set(tree) == {ARRAY_MARK}:
            return arrays[tree[ARRAY_MARK]]
        return {key: _join(value, arrays) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_join(value, arrays) for value in tree]
    return tree


def save_arrays(file, arrays):
    """Write named arrays (host copies) to an open binary file in NumPy's .npz format."""
    numpy.savez(file, **{name: backend.to_host(array) for name, array in arrays.items()})


def load_arrays(path):
    """Read every array of an .npz file into memory, refusing pickled objects."""
    with numpy.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _unreadable_entry(path):
    """(name, method) of the first zip entry compressed in a way zipfile cannot read, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type not in READABLE_METHODS:
                    return info.filename, info.compress_type
    except Exception:  # asked only to word an error already caught; a second one adds nothing
        pass
    return None


def save(path, state):
    """Write `state` (nested dicts and lists of arrays, Tensors, numbers and strings) to `path` atomically."""
    arrays = {}
    skeleton = _split(state, arrays)
    arrays["__format__"] = numpy.array(FORMAT)  # strings as 0-d unicode arrays: storable without pickle
    arrays["__skeleton__"] = numpy.array(json.dumps(skeleton))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            save_arrays(file, arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def remove_temporaries(folder):
    """Delete the temporary files of saves in `folder` that never finished (a process killed
    mid-save leaves one); returns their paths. Only for a folder no save is writing to now."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        if name.startswith(TEMPORARY_PREFIX) and name.endswith(TEMPORARY_SUFFIX):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                continue
            removed.append(os.path.join(folder, name))
    return removed


def load(path):
    """Read a checkpoint written by `save`; any problem is a CheckpointError naming the file."""
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file")
    with open(path, "rb") as file:
        if file.read(4) != ZIP_MAGIC:
            raise CheckpointError(path, "not an .npz file (a tinyattn checkpoint is a zip archive of arrays)")
    try:
        arrays = load_arrays(path)
    except ValueError as error:
        if "pickle" in str(error):
            raise CheckpointError(path, "contains pickled objects, which tinyattn never writes and will not load") from None
        raise CheckpointError(path, f"not a readable .npz file ({error})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointError(path, f"truncated or not an .npz file ({type(error).__name__}: {error})") from None
    except (NotImplementedError, RuntimeError) as error:  # zipfile: a compression method or zip version it lacks
        entry = _unreadable_entry(path)
        where = f"its entry {entry[0]!r} uses zip compression method {entry[1]}" if entry else f"it needs a zip feature ({error})"
        raise CheckpointError(path, f"{where}, which Python's zipfile cannot read; tinyattn writes plain, uncompressed entries") from None
    except (tokenize.TokenError, SyntaxError) as error:  # an array header that is not a Python literal
        raise CheckpointError(path, f"damaged: an array's header cannot be parsed ({error})") from None
    except zlib.error as error:
        raise CheckpointError(path, f"damaged: a compressed entry does not decompress ({error})") from None
    if "__format__" not in arrays or str(arrays["__format__"]) != FORMAT:
        raise CheckpointError(path, f"not a tinyattn checkpoint (no '{FORMAT}' marker)")
    try:
        return _join(json.loads(str(arrays["__skeleton__"])), arrays)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(path, f"damaged: {error}") from None
    except RecursionError:
        raise CheckpointError(path, "damaged: its JSON skeleton is nested too deeply to read "
                              "(a tinyattn checkpoint's is a few levels deep)") from None
