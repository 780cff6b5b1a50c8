"""Reads PyTorch `torch.save` zip archives without PyTorch, and without running code.

A `.pth` file is a zip archive holding `<prefix>/data.pkl` (a pickle) and one raw
little-endian buffer per storage in `<prefix>/data/<key>`. The pickle refers to the buffers
through persistent ids and rebuilds tensors with `torch._utils._rebuild_tensor_v2`.

Unpickling is code execution in disguise: a crafted pickle can call any importable
function. This reader resolves only the handful of globals a tensor archive needs (the
rebuild functions, storage types, `OrderedDict`) and refuses every other one *before*
anything is called, raising `CheckpointError` that names the file and the global.
"""

import collections
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from maeday_jax.checkpoints.errors import CheckpointError

# Storage class name -> NumPy dtype (the legacy typed storages `torch.save` still writes).
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": "bfloat16",
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  """Stand-in for a `torch.<X>Storage` class: only carries the element dtype."""

  def __init__(self, name: str):
    self.name = name
    dtype = _STORAGE_DTYPES[name]
    if dtype == "bfloat16":
      import ml_dtypes  # A JAX dependency; only needed for bfloat16 archives.

      dtype = ml_dtypes.bfloat16
    self.dtype = np.dtype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *args):
  """NumPy version of `torch._utils._rebuild_tensor_v2`: a strided view, copied."""
  del requires_grad, args  # Autograd flags and hooks mean nothing here.
  itemsize = storage.dtype.itemsize
  if not size:
    return np.array(storage[storage_offset])
  view = np.lib.stride_tricks.as_strided(
    storage[storage_offset:],
    shape=tuple(size),
    strides=tuple(s * itemsize for s in stride),
    writeable=False,
  )
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
  del requires_grad, backward_hooks, args
  return data


_ALLOWED_GLOBALS = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that knows only tensors, storages and ordered dicts."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._path = path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointError(
      f"{self._path}: refusing to load the global '{module}.{name}' from the checkpoint's "
      "pickle. Only plain tensor state dicts are accepted, because loading other objects "
      "can run arbitrary code. If you trust the file, re-save just its weights with "
      "PyTorch: torch.save({'model': state_dict}, 'weights.pth')."
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r} in the pickle.")
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self._path}: unsupported storage type {storage_type!r}.")
    key = str(key)
    if key not in self._storages:
      member = f"{self._prefix}/data/{key}"
      try:
        raw = self._archive.read(member)
      except KeyError as e:
        raise CheckpointError(f"{self._path}: storage '{member}' is missing.") from e
      array = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
      if array.size < numel:
        raise CheckpointError(
          f"{self._path}: storage '{member}' holds {array.size} elements, expected {numel}; "
          "the file is truncated or corrupt."
        )
      self._storages[key] = array.astype(storage_type.dtype, copy=False)
    return self._storages[key]


def is_torch_zip(path: str | os.PathLike) -> bool:
  """Whether `path` looks like a `torch.save` zip archive (has a `*/data.pkl`)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())


def load(path: str | os.PathLike) -> Any:
  """Loads the object saved in a PyTorch zip archive, with tensors as NumPy arrays.

  Raises:
    CheckpointError: the file is not a PyTorch zip archive, is corrupt, or its pickle
      references anything other than tensors and plain containers.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise CheckpointError(
      f"{path}: not a PyTorch zip archive (files saved by torch >= 1.6 are zip archives; "
      "re-save older ones with a current PyTorch)."
    )
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
      if not pickles:
        raise CheckpointError(f"{path}: zip archive without data.pkl; not a PyTorch checkpoint.")
      prefix = pickles[0][: -len("data.pkl")].rstrip("/")
      byteorder = f"{prefix}/byteorder"
      if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(f"{path}: big-endian archives are not supported.")
      with archive.open(pickles[0]) as f:
        return _RestrictedUnpickler(f, archive, prefix, path).load()
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: corrupt PyTorch archive ({e}).") from e
