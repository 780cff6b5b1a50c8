"""Exporting a fitted detector as StableHLO (`jax.export`): it then runs with JAX alone.

    exporting.export_stablehlo(detector, "runs/line3/exported", platforms=("cpu", "cuda"))
    net = exported.load("runs/line3/exported")           # no model code, no config
    maps, scores = net.score(images)                      # NHWC, ImageNet-normalised

Written:

  <dir>/model.stablehlo   the serialized `jax.export.Exported` of
                          `score(state, images, ids[, valid]) -> (maps, scores)` with a
                          symbolic batch dimension, lowered for `platforms`
  <dir>/state.npz         the detector's state leaves (`leaf_<i>`, in the export's order)
  <dir>/manifest.json     input size, normalisation, outputs, threshold, method,
                          whether it is transductive, platforms, versions

Randomness: MAEDAY's masks come from the artifact's seed, baked into the export, and each
image's content id (`content_ids.image_ids`: the SHA-256 of the float32 input), a declared
input that `exported.load(...).score` computes the way the library does; so the exported
and the library scores agree for the same images. A transductive detector (MuSc) also
takes `valid` (B,) bool. ONNX: `exporting_onnx`, which shares `scoring`, `input_specs` and
`manifest_of` with this module.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import atomic_files, parallel
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors.base import Detector

FORMAT_VERSION = 1
MODULE_FILE = "model.stablehlo"
STATE_FILE = "state.npz"
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_stablehlo(
  detector: Detector,
  directory: str | os.PathLike,
  *,
  platforms: tuple[str, ...] = ("cpu",),
  threshold: dict | None = None,
) -> pathlib.Path:
  """Writes `detector` as a StableHLO module, its state and a manifest into `directory`.

  Raises:
    ValueError: an unknown platform.
  """
  from jax import export

  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms {unknown or '()'}: choose among {', '.join(PLATFORMS)}.")
  directory = pathlib.Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  score, key = scoring(detector)
  transductive = bool(detector.transductive)

  def run(state, images, ids, *valid):
    return score(state, images, ids, key, *valid)  # The key is baked in: the artifact's seed.

  batch = export.symbolic_shape("batch")[0]
  state = jax.tree.map(lambda x: jnp.asarray(x), detector.state)
  specs = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)]
  specs += input_specs(detector, batch)
  exported = export.export(jax.jit(run), platforms=tuple(platforms))(*specs)
  leaves = jax.tree_util.tree_leaves(state)
  with atomic_files.replace_when_done(directory / STATE_FILE) as tmp, open(tmp, "wb") as f:
    np.savez(f, **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
  with atomic_files.replace_when_done(directory / MODULE_FILE) as tmp:
    pathlib.Path(tmp).write_bytes(exported.serialize())
  manifest = manifest_of(
    detector,
    threshold,
    format="stablehlo",
    inputs=["state", "images", "ids", *(["valid"] if transductive else [])],
    platforms=list(platforms),
    state_leaves=len(leaves),
  )
  atomic_files.write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
  return directory


def scoring(detector: Detector):
  """(score, key): the detector's one-device score function and the key it is called
  with (the detector's own seed, so the export scores like every job)."""
  mesh = parallel.data_mesh(jax.local_devices()[:1])  # An export is one device's program.
  grid = detector.tiling
  if grid is not None and grid.native and grid.tile_size > grid.image_size:
    raise ConfigError(
      f"--config.tiling.image_size: an exported program takes square {grid.image_size} px "
      f"images and tiles them inside (a program has fixed shapes), so they must hold a "
      f"{grid.tile_size} px tile; refit with tiling.image_size >= {grid.tile_size}."
    )
  return detector.scoring_function(mesh, 1), detector.scoring_key()  # Tiled, if it is.


def input_specs(detector: Detector, batch) -> list[jax.ShapeDtypeStruct]:
  """The score function's image inputs for `batch` images: images (B, S, S, 3) float32,
  content ids (B, 2) uint32 and, for a transductive detector, valid (B,) bool."""
  size = detector.read_size  # The tiled image size when the detector tiles.
  specs = [
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    jax.ShapeDtypeStruct((batch, 2), jnp.uint32),
  ]
  if detector.transductive:
    specs.append(jax.ShapeDtypeStruct((batch,), jnp.bool_))
  return specs


def manifest_of(detector: Detector, threshold: dict | None, **fields) -> dict:
  """The manifest fields every export format shares, then `fields`."""
  grid = detector.tiling
  native = bool(grid is not None and grid.native)
  return {
    "format_version": FORMAT_VERSION,
    "method": detector.method,
    "description": detector.describe(),
    "input_size": detector.read_size,
    "tiling": None if grid is None else dataclasses.replace(grid, short_side=0).describe(),
    # A program has fixed shapes: images are tiled square at `input_size` inside it, also
    # for a detector that the library tiles at each image's own size; that detector's
    # threshold was fitted on images read with their aspect ratio kept, so it is left out.
    "aspect_kept_by_library_only": native,
    "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "outputs": ["maps", "scores"],
    "transductive": bool(detector.transductive),
    "threshold": None
    if native
    else (threshold if threshold is not None else getattr(detector, "threshold", None)),
    "versions": {"jax": jax.__version__, "maeday_jax": _version()},
    **fields,
  }


def _version() -> str | None:
  try:
    return importlib.metadata.version("maeday_jax")
  except importlib.metadata.PackageNotFoundError:
    return None
