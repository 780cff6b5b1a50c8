"""State dicts read from `.pth` or safetensors files, whatever network they hold.

    state = read_state_dict("resnet18-f37072fd.pth")   # {torch key: np.ndarray}

A `.pth` goes through the restricted reader `torch_zip` (no code from the file runs); a
safetensors file through the `safetensors` package. `{"model": ...}` / `{"state_dict":
...}` wrappers and the `module.` prefix of DistributedDataParallel are removed. Keys are
left as the file has them: renaming them for a network is its importer's job
(`maeday_jax.models.mae_import`, `maeday_jax.models.resnet_import`), which also checks
`is_state_dict_file` first to explain, in its own words, what it can load instead.
"""

import os
import pathlib
import struct
from typing import Any

import numpy as np

from maeday_jax.weight_files import torch_zip
from maeday_jax.weight_files.errors import CheckpointError

__all__ = ["is_safetensors", "is_state_dict_file", "read_state_dict"]


def is_safetensors(path: str | os.PathLike) -> bool:
  """Whether `path` starts like a safetensors file (a little-endian header size, then JSON)."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  (header_len,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < header_len < path.stat().st_size


def is_state_dict_file(path: str | os.PathLike) -> bool:
  """Whether `read_state_dict` can read `path`: a PyTorch zip archive or safetensors."""
  return torch_zip.is_torch_zip(path) or is_safetensors(path)


def unwrap_state_dict(
  obj: Any,
  source: str,
  prefixes: tuple[str, ...] = ("module.",),
  what: str = "a state dict of tensors (or {'model': state_dict})",
) -> dict[str, np.ndarray]:
  """Finds the state dict inside a loaded `.pth` object ({'model': sd}, {'state_dict': sd}
  or sd itself) and strips each of `prefixes` that every key carries, in order
  (DistributedDataParallel prefixes every key with 'module.').

  Raises:
    CheckpointError: no dict of arrays inside, naming `source` and `what` was expected.
  """
  if isinstance(obj, dict):
    for key in ("model", "state_dict"):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise CheckpointError(f"{source}: expected {what}, found {type(obj).__name__}.")
  state = dict(obj)
  for prefix in prefixes:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix) :]: v for k, v in state.items()}
  return state


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.pth` (PyTorch zip archive) or safetensors file as NumPy arrays by key.

  Raises:
    CheckpointError: the file is of another format, corrupt or crafted (naming the file).
  """
  path = pathlib.Path(path)
  if torch_zip.is_torch_zip(path):
    return unwrap_state_dict(torch_zip.load(path), str(path))
  if is_safetensors(path):
    # Imported here: only safetensors files need the package.
    from safetensors.numpy import load_file

    try:
      return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(f"{path}: corrupt safetensors file ({e}).") from e
  raise CheckpointError(
    f"{path}: neither a PyTorch zip archive (a file written by torch.save) nor a safetensors file."
  )
