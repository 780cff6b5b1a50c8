"""Official ViT-MAE weights -> `maeday_jax.models.vit_mae.MaskedAutoencoder` and its params.

    model, params = load_mae("mae_vit_large")   # a known name or a local path
    pred = model.apply({"params": params}, images, noise=noise)  # (B, L, p*p*3)
    convert("mae_visualize_vit_large.pth", "converted/")   # the fast format, once

A path may be an official MAE `.pth`, a Hugging Face `ViTMAEForPreTraining` safetensors
file, or a directory converted by `convert` / `tools/convert_checkpoint.py`
(`maeday_jax.weight_files.orbax_format`). The files are read by `maeday_jax.weight_files`;
the keys are renamed to Flax paths by `mae_state_dict`.

Known names (`KNOWN_CHECKPOINTS`, a view of the shared table `maeday_jax.models.weights`)
download the official file once into the cache (`$MAEDAY_CACHE_DIR`, default
`~/.cache/maeday_jax`), verify it, convert it to the Orbax format and reuse that copy.

The architecture is read off the tensor shapes (`infer_architecture`). Head counts are not
visible in the shapes. Official widths use the official counts (encoder 768 -> 12, 1024
-> 16, 1280 -> 16; decoder 512 -> 16); other widths use a head dimension of 64 in the
encoder and 32 in the decoder (at least one head). Both can be overridden
(`load_mae(..., num_heads=..., decoder_num_heads=...)`).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.download import RemoteFile
from maeday_jax.models import weights
from maeday_jax.models.mae_state_dict import (
  DECODER_KEYS,
  hugging_face_to_official,
  is_hugging_face,
  to_params,
)
from maeday_jax.models.vit_mae import MaskedAutoencoder, param_shapes
from maeday_jax.weight_files import CheckpointError, orbax_format, state_dicts

__all__ = [
  "KNOWN_CHECKPOINTS",
  "convert",
  "infer_architecture",
  "load_mae",
  "read_state_dict",
  "resolve",
]


def _entry(remote: RemoteFile) -> weights.Weights:
  return weights.Weights(
    remote.url,
    "mae",
    sha256=remote.sha256,
    sha256_prefix=remote.sha256_prefix,
    size=remote.size,
  )


KNOWN_CHECKPOINTS = weights.known("mae", lambda entry: entry.remote, _entry)
"""MAE names -> `RemoteFile`: a live view of the MAE entries of `weights.KNOWN`
(registering a name here makes `load_mae` find it)."""

# Head counts of the official widths (the shapes do not show them); other widths get
# width / head dimension.
OFFICIAL_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
OFFICIAL_DECODER_HEADS = {512: 16}
ENCODER_HEAD_DIM = 64
DECODER_HEAD_DIM = 32


def default_heads(width: int, official: dict[int, int], head_dim: int) -> int:
  """Head count for a width: the official one if known, else width / head_dim."""
  return official.get(width, max(1, width // head_dim))


def _count_blocks(state: dict, stack: str) -> int:
  indices = {int(m.group(1)) for k in state if (m := re.match(rf"{stack}\.(\d+)\.", k))}
  return max(indices) + 1 if indices else 0


def infer_architecture(
  state: dict[str, np.ndarray],
  source: str,
  num_heads: int | None = None,
  decoder_num_heads: int | None = None,
) -> dict:
  """Returns `MaskedAutoencoder` keyword arguments that fit `state`'s tensors."""
  if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
    raise CheckpointError(
      f"{source}: no 'patch_embed.proj.weight'/'pos_embed' tensors; this is not an MAE "
      "checkpoint (expected the official MAE keys or Hugging Face ViTMAEForPreTraining names)."
    )
  if not all(k in state for k in DECODER_KEYS):
    raise CheckpointError(
      f"{source}: the checkpoint has no decoder ({', '.join(DECODER_KEYS)} are missing). "
      "Encoder-only files such as mae_pretrain_vit_*.pth cannot reconstruct images; use the "
      "checkpoints with the decoder (mae_visualize_vit_base/large/huge.pth, or the names "
      "mae_vit_base, mae_vit_large, mae_vit_huge, mae_vit_large_ganloss)."
    )
  embed_dim, in_chans, patch, patch_w = np.shape(state["patch_embed.proj.weight"])
  num_tokens = np.shape(state["pos_embed"])[1]
  grid = math.isqrt(num_tokens - 1)
  if patch != patch_w or grid * grid != num_tokens - 1:
    raise CheckpointError(
      f"{source}: non-square patches ({patch}x{patch_w}) or patch grid ({num_tokens - 1} "
      "patches) are not supported."
    )
  decoder_embed_dim = np.shape(state["decoder_embed.weight"])[0]
  depth = _count_blocks(state, "blocks")
  mlp_hidden = np.shape(state["blocks.0.mlp.fc1.weight"])[0] if depth else 4 * embed_dim
  arch = dict(
    img_size=int(grid * patch),
    patch_size=int(patch),
    in_chans=int(in_chans),
    embed_dim=int(embed_dim),
    depth=depth,
    num_heads=num_heads or default_heads(embed_dim, OFFICIAL_ENCODER_HEADS, ENCODER_HEAD_DIM),
    decoder_embed_dim=int(decoder_embed_dim),
    decoder_depth=_count_blocks(state, "decoder_blocks"),
    decoder_num_heads=decoder_num_heads
    or default_heads(decoder_embed_dim, OFFICIAL_DECODER_HEADS, DECODER_HEAD_DIM),
    mlp_ratio=float(mlp_hidden / embed_dim),
  )
  for field, width in (("num_heads", embed_dim), ("decoder_num_heads", decoder_embed_dim)):
    if width % arch[field]:
      raise CheckpointError(
        f"{source}: width {width} is not divisible by {field}={arch[field]}; pass "
        f"{field}=... to load_mae."
      )
  return arch


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.pth` or safetensors checkpoint as an official-key state dict (NumPy).

  Hugging Face `ViTMAEForPreTraining` names are renamed to the official ones.

  Raises:
    CheckpointError: the file is of another format, corrupt or crafted.
  """
  path = pathlib.Path(path)
  if not state_dicts.is_state_dict_file(path):
    raise CheckpointError(
      f"{path}: not a checkpoint this library can read. Expected an official MAE .pth "
      "(PyTorch zip archive), a Hugging Face ViTMAEForPreTraining .safetensors file, or a "
      "directory converted by tools/convert_checkpoint.py."
    )
  state = state_dicts.read_state_dict(path)
  if is_hugging_face(state):
    state = hugging_face_to_official(state, str(path))
  return state


def _build(arch: dict, dtype, mask_ratio: float, attention: str = "auto") -> MaskedAutoencoder:
  return MaskedAutoencoder(**arch, dtype=dtype, mask_ratio=mask_ratio, attention=attention)


def _load_file(path: pathlib.Path, num_heads, decoder_num_heads):
  state = read_state_dict(path)
  arch = infer_architecture(state, str(path), num_heads, decoder_num_heads)
  params = to_params(state, param_shapes(_build(arch, jnp.float32, 0.75)), str(path))
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
  """Maps a known name or a path to a local checkpoint, downloading/converting once.

  Known names go through the shared resolver (`models.weights.resolve`: cached download,
  hash-checked); the file is then converted once to `<cache>/<name>_orbax`, which later
  calls return directly.

  Raises:
    CheckpointError: neither a known name nor an existing path, or a downloaded file
      that does not load (it is deleted).
    DownloadError: the download failed or arrived corrupt (nothing is kept).
  """
  text = os.fspath(name_or_path)
  if not weights.is_known(text, "mae"):
    return weights.resolve(text, cache_dir, kind="mae")
  root = pathlib.Path(cache_dir).expanduser() if cache_dir else weights.default_cache_dir()
  converted = root / f"{text}_orbax"
  if orbax_format.is_converted(converted):
    return converted
  raw = weights.resolve(text, cache_dir, kind="mae")
  try:
    arch, params = _load_file(raw, None, None)
  except CheckpointError as e:
    raise weights.discard_download(raw, e) from e
  shutil.rmtree(converted, ignore_errors=True)  # Leftovers of an interrupted conversion.
  return orbax_format.save(converted, arch, params, source=KNOWN_CHECKPOINTS[text].url)


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
