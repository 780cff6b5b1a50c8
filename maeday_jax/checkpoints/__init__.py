"""Loading MAE checkpoints: official `.pth`, Hugging Face safetensors, converted Orbax.

    from maeday_jax import checkpoints
    model, params = checkpoints.load_mae("mae_vit_large")   # or a local path
    pred = model.apply({"params": params}, images, noise=noise)  # (B, L, p*p*3)

Known names download the official file once into the cache (`$MAEDAY_CACHE_DIR`, default
`~/.cache/maeday_jax`), verify it, convert it to the Orbax format and reuse that copy.
"""

import os
import pathlib
import shutil
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.checkpoints import architecture, download, orbax_format, state_dict, torch_zip
from maeday_jax.checkpoints.download import KNOWN_CHECKPOINTS
from maeday_jax.checkpoints.errors import CheckpointError
from maeday_jax.download import DownloadError, RemoteFile
from maeday_jax.models import MaskedAutoencoder, param_shapes

__all__ = [
  "KNOWN_CHECKPOINTS",
  "CheckpointError",
  "DownloadError",
  "RemoteFile",
  "convert",
  "is_safetensors",
  "load_mae",
  "read_state_dict",
  "resolve",
]


def is_safetensors(path: pathlib.Path) -> bool:
  """Whether `path` starts like a safetensors file (a little-endian header size, then JSON)."""
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  (header_len,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < header_len < path.stat().st_size


def _unwrap(obj: Any, source: str) -> dict[str, np.ndarray]:
  """Finds the state dict inside a loaded `.pth` object ({'model': sd} or sd itself)."""
  if isinstance(obj, dict):
    for key in ("model", "state_dict"):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise CheckpointError(
      f"{source}: expected a state dict of tensors (or {{'model': state_dict}}), found "
      f"{type(obj).__name__}."
    )
  # Checkpoints saved from DistributedDataParallel prefix every key with 'module.'.
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module.") :]: v for k, v in obj.items()}
  return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.pth` or safetensors checkpoint as an official-key state dict (NumPy)."""
  path = pathlib.Path(path)
  if torch_zip.is_torch_zip(path):
    return _unwrap(torch_zip.load(path), str(path))
  if is_safetensors(path):
    from safetensors.numpy import load_file

    try:
      state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(f"{path}: corrupt safetensors file ({e}).") from e
    if state_dict.is_hugging_face(state):
      state = state_dict.hugging_face_to_official(state, str(path))
    return state
  raise CheckpointError(
    f"{path}: not a checkpoint this library can read. Expected an official MAE .pth "
    "(PyTorch zip archive), a Hugging Face ViTMAEForPreTraining .safetensors file, or a "
    "directory converted by tools/convert_checkpoint.py."
  )


def _build(arch: dict, dtype, mask_ratio: float, attention: str = "auto") -> MaskedAutoencoder:
  return MaskedAutoencoder(**arch, dtype=dtype, mask_ratio=mask_ratio, attention=attention)


def _load_file(path: pathlib.Path, num_heads, decoder_num_heads):
  state = read_state_dict(path)
  arch = architecture.infer(state, str(path), num_heads, decoder_num_heads)
  params = state_dict.to_params(state, param_shapes(_build(arch, jnp.float32, 0.75)), str(path))
  return arch, params


def convert(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  num_heads: int | None = None,
  decoder_num_heads: int | None = None,
) -> pathlib.Path:
  """Converts an official `.pth` or safetensors file into a converted Orbax directory."""
  src = pathlib.Path(src).expanduser()
  if not src.is_file():
    raise CheckpointError(f"{src}: no such checkpoint file.")
  arch, params = _load_file(src, num_heads, decoder_num_heads)
  return orbax_format.save(dst, arch, params, source=str(src))


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
  """Maps a known name or a path to a local checkpoint, downloading/converting once."""
  text = os.fspath(name_or_path)
  if text in KNOWN_CHECKPOINTS:
    remote = KNOWN_CHECKPOINTS[text]
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else download.default_cache_dir()
    converted = root / f"{text}_orbax"
    if orbax_format.is_converted(converted):
      return converted
    raw = download.download(remote, root / remote.filename)
    try:
      arch, params = _load_file(raw, None, None)
    except CheckpointError as e:
      raw.unlink(missing_ok=True)  # Never keep a file that failed to load in the cache.
      raise CheckpointError(f"{e}\nThe downloaded file {raw} was deleted; try again.") from e
    shutil.rmtree(converted, ignore_errors=True)  # Leftovers of an interrupted conversion.
    return orbax_format.save(converted, arch, params, source=remote.url)
  path = pathlib.Path(text).expanduser()
  if not path.exists():
    raise CheckpointError(
      f"Checkpoint {text!r} is neither an existing path nor a known name "
      f"({', '.join(sorted(KNOWN_CHECKPOINTS))})."
    )
  return path


def load_mae(
  name_or_path: str | os.PathLike,
  *,
  num_heads: int | None = None,
  decoder_num_heads: int | None = None,
  dtype: Any = jnp.float32,
  mask_ratio: float = 0.75,
  cache_dir: str | os.PathLike | None = None,
  attention: str = "auto",
) -> tuple[MaskedAutoencoder, dict]:
  """Loads an MAE with its decoder; returns `(model, params)`.

  Args:
    name_or_path: a known name (`mae_vit_base`, `mae_vit_large`, `mae_vit_huge`,
      `mae_vit_large_ganloss`), an official `.pth`, a Hugging Face safetensors file, or a
      directory written by `convert` / `tools/convert_checkpoint.py`.
    num_heads, decoder_num_heads: override the inferred head counts (not in the shapes).
    dtype: compute dtype of the returned model; parameters are float32 regardless.
    mask_ratio: the model's default mask ratio.
    cache_dir: where known names are downloaded and converted.
    attention: 'auto', 'einsum', 'xla' or 'cudnn' (`models.resolve_attention`).

  Raises:
    CheckpointError: with the file, what is wrong and what to do instead.
  """
  path = resolve(name_or_path, cache_dir)
  if path.is_dir():
    if not orbax_format.is_converted(path):
      raise CheckpointError(
        f"{path}: a directory, but not one written by tools/convert_checkpoint.py (no "
        f"{orbax_format.CONFIG_FILE})."
      )
    arch = orbax_format.load_architecture(path)
    if num_heads:
      arch["num_heads"] = num_heads
    if decoder_num_heads:
      arch["decoder_num_heads"] = decoder_num_heads
    model = _build(arch, dtype, mask_ratio, attention)
    params = orbax_format.load_params(path, param_shapes(model))
  else:
    arch, params = _load_file(path, num_heads, decoder_num_heads)
    model = _build(arch, dtype, mask_ratio, attention)
  return model, jax.tree.map(jnp.asarray, params)
