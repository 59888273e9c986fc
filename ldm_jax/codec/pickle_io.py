"""A restricted reader of PyTorch `.pth` checkpoints (`torch.save` zip files), without torch.

A `torch.save` file is a zip archive holding `ARCHIVE/data.pkl`, a pickle of the saved object in
which every tensor is a call to `torch._utils._rebuild_tensor_v2` over a storage, and each
storage a persistent id naming the raw little-endian bytes `ARCHIVE/data/KEY`. Unpickling
normally imports and calls whatever the pickle names; here `find_class` resolves only the tensor
rebuild helpers, `collections.OrderedDict` and the storage types (to local numpy stand-ins) and
refuses everything else, so loading never runs code from the file. This is the same allow-list
idea as `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names an object outside the allow-list."""


def _bfloat16():
    import ml_dtypes  # shipped with jax

    return ml_dtypes.bfloat16


class _StorageType:
    """Stands in for `torch.FloatStorage` & co.: only carries the element dtype."""

    def __init__(self, name: str, dtype):
        self.name = name
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2` for numpy: a strided view of the storage, copied."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("a tensor is built from something that is not a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError("a tensor has an invalid size, stride or offset")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.shape[0]:
        raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    """`torch._utils._rebuild_parameter`: a parameter is its tensor here."""
    del requires_grad, backward_hooks, state
    return data


def _allowed(module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _rebuild_tensor_v2
    if module == "torch._utils" and name in ("_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        dtype = _STORAGE_DTYPES[name] or _bfloat16()
        return _StorageType(name, dtype)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"refusing to load {os.path.basename(self._path)}: it contains object "
                f"{module}.{name}; only tensors and plain containers are allowed")
        return obj

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)):
            raise UnsafeCheckpointError(
                f"refusing to load {os.path.basename(self._path)}: it references an external "
                "object that is not a tensor storage")
        storage_type, key = pid[1], pid[2]
        if key not in self._storages:
            entry = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(entry)
            except KeyError:
                raise CheckpointError(f"{self._path} is damaged: it has no storage {entry}; "
                                      "download or save it again") from None
            dtype = np.dtype(storage_type.dtype).newbyteorder(self._byteorder)
            usable = len(raw) - len(raw) % dtype.itemsize
            self._storages[key] = np.frombuffer(raw[:usable], dtype=dtype).astype(
                np.dtype(storage_type.dtype))
        return self._storages[key]


def load_pth(path: str | os.PathLike) -> Any:
    """Reads a `torch.save` zip checkpoint into plain Python containers and numpy arrays.

    Args:
      path: the `.pth` / `.pt` file.

    Returns:
      The saved object, with every tensor as a numpy array (bfloat16 as `ml_dtypes.bfloat16`).

    Raises:
      UnsafeCheckpointError: the pickle names an object other than tensors and containers.
      CheckpointError: the file is missing, not a zip checkpoint, or damaged.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a zip-format PyTorch checkpoint; re-save it with "
                              "torch.save from torch >= 1.6")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist()
                       if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is not a PyTorch checkpoint: expected one "
                                      "ARCHIVE/data.pkl entry")
            prefix = pickles[0][:-len("data.pkl")]
            names = set(archive.namelist())
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            with archive.open(pickles[0]) as f:
                unpickler = _RestrictedUnpickler(f, archive, prefix, path, byteorder)
                return unpickler.load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({e}); download or "
                              "save it again") from None
