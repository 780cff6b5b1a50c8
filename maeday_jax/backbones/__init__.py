"""ImageNet ResNet backbones (torchvision layout) for feature-based detectors such as PatchCore.

    from maeday_jax import backbones
    model, variables = backbones.load_backbone("wide_resnet50_2")   # or a local path
    features = model.apply(variables, images, stages=("layer2", "layer3"))
    features["layer2"].shape  # (B, H / 8, W / 8, 512), NHWC

`images` are NHWC RGB in ImageNet-normalised space (`maeday_jax.imagenet.normalize`).

Known names (`KNOWN_BACKBONES`) download torchvision's published weights once into
`<cache>/backbones/` (`$MAEDAY_CACHE_DIR`, default `~/.cache/maeday_jax`), checking the
SHA-256 prefix in the file name. A path may be any torchvision or timm ResNet state dict,
as `.pth` (read without running code from the file) or `.safetensors`; the architecture
is inferred from it. PyTorch is never needed.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from maeday_jax import download
from maeday_jax.backbones import convert, resnet
from maeday_jax.backbones.convert import from_state_dict, infer_architecture, read_state_dict
from maeday_jax.backbones.resnet import (
  STAGE_STRIDES,
  STAGES,
  VARIANTS,
  BasicBlock,
  Bottleneck,
  ResNet,
  create,
  init_variables,
  variable_shapes,
)
from maeday_jax.checkpoints.download import default_cache_dir
from maeday_jax.checkpoints.errors import CheckpointError
from maeday_jax.download import DownloadError

__all__ = [
  "KNOWN_BACKBONES",
  "STAGES",
  "STAGE_STRIDES",
  "VARIANTS",
  "BasicBlock",
  "Bottleneck",
  "CheckpointError",
  "DownloadError",
  "ResNet",
  "convert",
  "create",
  "from_state_dict",
  "infer_architecture",
  "init_variables",
  "load_backbone",
  "read_state_dict",
  "resnet",
  "resolve",
  "variable_shapes",
]

_TORCHVISION_URL = "https://download.pytorch.org/models/"

KNOWN_BACKBONES: dict[str, str] = {
  "resnet18": _TORCHVISION_URL + "resnet18-f37072fd.pth",
  "resnet50": _TORCHVISION_URL + "resnet50-0676ba61.pth",
  "wide_resnet50_2": _TORCHVISION_URL + "wide_resnet50_2-95faca4d.pth",
}
"""Backbone names -> torchvision's ImageNet weights (IMAGENET1K_V1). The file names carry
the first hex digits of each file's SHA-256, which the download checks."""

CACHE_SUBDIR = "backbones"


def _local_copy_hint(name: str, remote: download.RemoteFile, dest: pathlib.Path) -> str:
  return (
    f"If this machine is offline, download {remote.url} elsewhere and either pass its "
    f"local path instead of {name!r} (load_backbone('/path/{remote.filename}')) or copy "
    f"it to {dest}."
  )


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
  """Maps a known name or a path to a local checkpoint file, downloading a name once.

  Raises:
    CheckpointError: neither a known name nor an existing file.
    DownloadError: the download failed or arrived corrupt (nothing is kept).
  """
  text = os.fspath(name_or_path)
  if text in KNOWN_BACKBONES:
    url = KNOWN_BACKBONES[text]
    remote = download.RemoteFile(url, sha256_prefix=download.sha256_prefix_from_name(url))
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = root / CACHE_SUBDIR / remote.filename
    hint = _local_copy_hint(text, remote, dest)
    return download.fetch(remote, dest, what=f"the {text} backbone", hint=hint)
  path = pathlib.Path(text).expanduser()
  if not path.is_file():
    raise CheckpointError(
      f"Backbone {text!r} is neither an existing file nor a known name "
      f"({', '.join(sorted(KNOWN_BACKBONES))})."
    )
  return path


def load_backbone(
  path_or_name: str | os.PathLike,
  *,
  cache_dir: str | os.PathLike | None = None,
  dtype: Any = jnp.float32,
) -> tuple[ResNet, dict]:
  """Loads a ResNet backbone; returns `(model, variables)` for `model.apply`.

  Args:
    path_or_name: a known name (`resnet18`, `resnet50`, `wide_resnet50_2`) or a
      torchvision / timm ResNet state dict (`.pth` or `.safetensors`).
    cache_dir: where known names are downloaded (into its `backbones/` folder); default
      `$MAEDAY_CACHE_DIR` or `~/.cache/maeday_jax`.
    dtype: compute dtype of the model; the variables are float32 regardless.

  Returns:
    The `ResNet` (architecture inferred from the file) and its variables
    {"params", "batch_stats"} as JAX arrays.

  Raises:
    CheckpointError: the file is unreadable, crafted, or not a torchvision-layout ResNet;
      the message names the file and the offending keys. A downloaded file that fails
      to load is deleted.
    DownloadError: a known name could not be downloaded intact.
  """
  path = resolve(path_or_name, cache_dir)
  try:
    model, variables = from_state_dict(read_state_dict(path), source=str(path), dtype=dtype)
  except CheckpointError as e:
    if os.fspath(path_or_name) not in KNOWN_BACKBONES:
      raise
    path.unlink(missing_ok=True)  # Never keep a file that failed to load in the cache.
    raise CheckpointError(f"{e}\nThe downloaded file {path} was deleted; try again.") from e
  return model, jax.tree.map(jnp.asarray, variables)
